"""Core of the RunPod workers: everything but the thin handlers, testable without RunPod."""
