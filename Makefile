# Two commands on a fresh Debian 12 machine (root, or a user with sudo): `make dev`, `make test`.
# scripts/bootstrap installs what they need (apt packages, .venv) and is fast once done.

.PHONY: bootstrap dev test check

bootstrap:
	@./scripts/bootstrap

dev: bootstrap
	.venv/bin/lpmosd dev

test: bootstrap
	.venv/bin/pytest -q

check: bootstrap
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy
