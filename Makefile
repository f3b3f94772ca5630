# On a fresh Debian 12 machine the README's commands are scripts/dev and scripts/test (no make
# needed); these targets are shortcuts to them.
# scripts/bootstrap installs what they need (apt packages, .venv) and is fast once done.

.PHONY: bootstrap dev test check deb

bootstrap:
	@./scripts/bootstrap

dev:
	./scripts/dev

test:
	./scripts/test

check: bootstrap
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

# The Debian package, dist/lpmosd_<version>_<arch>.deb (see packaging/build-deb).
deb:
	./packaging/build-deb
