"""Tests of the install agent (lpmosd.agent)."""
