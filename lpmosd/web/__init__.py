"""HTTP apps (quart-trio on hypercorn): the control-plane API and dashboard, the agent API."""
