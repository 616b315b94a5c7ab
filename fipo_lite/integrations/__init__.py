"""Plug-ins that put the fipo_lite objective into engines that scale past one machine: verl and TRL."""
