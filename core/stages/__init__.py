"""Reusable stages of the multi-stage clip jobs (Orbit, VFX ingest): each one piece of work on
a decoded clip (masks, point tracks, consistent video depth, masked camera solve), knowing no
app. They sit beside the infer runner and the splat pipeline: they may use the tasks (models)
and the splat pipeline's SfM, and the apps above compose them into jobs."""
