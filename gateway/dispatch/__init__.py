"""Reaching the expert groups: dispatch plans and combine, transports, Ray replica pools."""
