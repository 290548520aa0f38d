# The README's two commands: `make up` and `make test`. Both install what is missing first.
.PHONY: up test lint bench gen fuzz lock

up:
	@scripts/bootstrap.sh
	@.venv/bin/meshserve up $(ARGS)

test:
	@scripts/bootstrap.sh
	@.venv/bin/ruff check services deploy tests bench clients
	@.venv/bin/mypy
	@.venv/bin/python -m pytest $(ARGS)

bench:
	@scripts/bootstrap.sh
	@command -v wrk >/dev/null || apt-get install -y -q wrk >/dev/null
	@.venv/bin/python -m bench.edge_vs_vllm $(ARGS)
	@.venv/bin/python -m bench.auth_overhead
	@.venv/bin/python -m bench.mtls
	@.venv/bin/python -m bench.ratelimit
	@.venv/bin/python -m bench.gateways
	@.venv/bin/python -m bench.affinity
	@.venv/bin/python -m bench.embeddings
	@.venv/bin/python -m bench.stream_tokens
	@.venv/bin/python -m bench.billing
	@.venv/bin/python -m bench.tracing
	@.venv/bin/python -m bench.tracing --engine vllm
	@.venv/bin/python -m bench.response_cache
	@.venv/bin/python -m bench.overflow

gen:
	@.venv/bin/meshserve gen

# The services image's install set, pinned with hashes (deploy/docker/services.lock), from pyproject.toml's
# dependencies for the image's Python and platform; a test fails when it no longer satisfies them.
lock:
	@.venv/bin/uv pip compile pyproject.toml --generate-hashes --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --no-header --quiet -o deploy/docker/services.lock

# The long fuzz run of the edge (10,000 cases per property); the report goes to bench/reports/fuzz.md.
fuzz:
	@scripts/bootstrap.sh
	@MESHSERVE_FUZZ_EXAMPLES=10000 MESHSERVE_FUZZ_REPORT=bench/reports/fuzz.md .venv/bin/python -m pytest tests/integration/test_fuzz.py -p no:cacheprovider -o timeout=7200 $(ARGS)
