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
	@command -v strace >/dev/null || apt-get install -y -q strace >/dev/null
	@.venv/bin/python -m bench.edge_vs_vllm $(ARGS)
	@.venv/bin/python -m bench.auth_overhead
	@.venv/bin/python -m bench.mtls
	@.venv/bin/python -m bench.ratelimit
	@.venv/bin/python -m bench.gateways
	@.venv/bin/python -m bench.affinity
	@.venv/bin/python -m bench.embeddings
	@.venv/bin/python -m bench.wakeups
	@.venv/bin/python -m bench.stream_tokens
	@.venv/bin/python -m bench.grpc_messages
	@.venv/bin/python -m bench.syscalls
	@.venv/bin/python -m bench.billing
	@.venv/bin/python -m bench.tracing
	@.venv/bin/python -m bench.tracing --engine vllm
	@.venv/bin/python -m bench.response_cache
	@.venv/bin/python -m bench.overflow

gen:
	@.venv/bin/meshserve gen

# Every install set pinned with hashes (bootstrap's and each image's), resolved from pyproject.toml: see
# scripts/lock.sh. Run it after changing the dependencies; a test fails when a lock no longer satisfies them.
lock:
	@scripts/lock.sh

# The long fuzz run of the edge (10,000 cases per property); the report goes to bench/reports/fuzz.md.
fuzz:
	@scripts/bootstrap.sh
	@MESHSERVE_FUZZ_EXAMPLES=10000 MESHSERVE_FUZZ_REPORT=bench/reports/fuzz.md .venv/bin/python -m pytest tests/integration/test_fuzz.py -p no:cacheprovider -o timeout=7200 $(ARGS)
