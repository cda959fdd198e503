"""Dagster Definitions, resources, partitions, schedules, sensors, jobs; and the sd3 command line."""
