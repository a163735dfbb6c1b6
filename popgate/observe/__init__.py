"""Observers of the session events (:mod:`popgate.events`): logs, trace, metrics."""
