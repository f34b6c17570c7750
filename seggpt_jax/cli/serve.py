"""``seggpt-jax serve``: the HTTP service (the ``serve`` extra). Nothing heavy is imported until it runs."""

from __future__ import annotations

import argparse
import os

from . import common
from .common import UserError, status

DTYPES = ("float32", "bfloat16")


def add_commands(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser(
        "serve", formatter_class=common.HelpFormatter,
        help="serve the model over HTTP with dynamic batching, registered prompts, metrics and a browser demo",
        description="Serve MODEL over HTTP: POST /v1/segment (multipart: query files with prompt_image/prompt_mask "
                    "files or a prompt_id; mask PNG or JSON back), POST /v1/prompts (register a prompt set, "
                    "preprocessed once), GET /healthz, /readyz, /metrics (Prometheus), /v1/info, the OpenAPI "
                    "schema at /openapi.json, and a demo page at /. Requests are batched by prompt count; every "
                    "batch size is compiled before /readyz says ready. SIGTERM finishes the requests in flight, "
                    "refuses new ones (503) and exits 0. Needs the serve extra: pip install 'seggpt-jax[serve]'.")
    common.add_positional_model(serve, "MODEL", "Hub repo id, local folder or weight file")
    net = serve.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    net.add_argument("--port", type=_port, default=8000, help="port to listen on (0: a free one, printed)")
    batching = serve.add_argument_group("batching")
    batching.add_argument("--max-batch", type=common.positive_int, default=None, metavar="ROWS",
                          help="rows per forward (query x prompt pairs); batch sizes are compiled for 1, 2, 4, ... "
                               "up to it; default: 1 on CPU (batch 1 is the fastest per image there), 32 on "
                               "accelerators")
    batching.add_argument("--max-wait-ms", type=_non_negative_float, default=None, metavar="MS",
                          help="how long the first query of a batch that is not full waits for more; default: 0 on "
                               "CPU, 5 on accelerators")
    batching.add_argument("--max-queue", type=common.positive_int, default=64, metavar="N",
                          help="queries that may wait for the device; more are refused with 429 and Retry-After")
    batching.add_argument("--max-prompts", type=common.positive_int, default=4, metavar="K",
                          help="prompts per query the server takes (1..K are compiled ahead)")
    limits = serve.add_argument_group("limits")
    limits.add_argument("--max-body-mb", type=common.positive_float, default=32.0, metavar="MB",
                        help="largest request body; larger ones get 413")
    limits.add_argument("--request-timeout-s", type=common.positive_float, default=60.0, metavar="S",
                        help="a request not answered by then gets 504 (a client may ask for less with timeout_s); "
                             "also the longest a drain waits")
    limits.add_argument("--prompt-cache-mb", type=common.positive_float, default=256.0, metavar="MB",
                        help="memory for registered prompt sets (least recently used first out)")
    limits.add_argument("--decode-threads", type=common.positive_int, default=None, metavar="N",
                        help="threads that decode uploads and encode masks, beside the device thread (default: "
                             "the CPU count, at most 4)")
    model = serve.add_argument_group("how the model runs")
    model.add_argument("--dtype", choices=DTYPES, default="float32",
                       help="compute dtype (bfloat16 for GPU/TPU)")
    common.add_devices_option(model)
    model.add_argument("--ensemble-mode", choices=["transformers", "original"], default="transformers",
                       help="how several prompts are combined: transformers' or the BAAI code's feature ensemble")
    model.add_argument("--compilation-cache", default=None, metavar="DIR",
                       help="folder of the persistent compilation cache (default: ~/.cache/seggpt_jax/xla, or "
                            "$SEGGPT_JAX_CACHE); a restart then loads the compiled programs instead of compiling")
    model.add_argument("--no-compilation-cache", action="store_true", help="compile everything at every start")
    on_ray = serve.add_argument_group("Ray Serve (the ray extra)")
    on_ray.add_argument("--ray", action="store_true",
                        help="serve as a Ray Serve deployment (the same HTTP API on --host/--port through Ray's proxy): "
                             "replicas of this service on a Ray cluster (RAY_ADDRESS or --ray-address), or on a local "
                             "Ray instance")
    on_ray.add_argument("--ray-address", default=None, metavar="ADDRESS",
                        help="the Ray cluster to join (default: $RAY_ADDRESS, else a new local instance)")
    on_ray.add_argument("--ray-replicas", type=common.positive_int, default=1, metavar="N",
                        help="replicas of the service (each loads the model on its own devices)")
    on_ray.add_argument("--ray-gpus-per-replica", type=common.positive_float, default=None, metavar="G",
                        help="GPUs per replica (ray_actor_options num_gpus; 1: one replica per GPU)")
    on_ray.add_argument("--ray-tpus-per-replica", type=common.positive_int, default=None, metavar="T",
                        help="TPU chips per replica (the TPU resource; e.g. 4 or 8: one replica per TPU host)")
    on_ray.add_argument("--ray-max-ongoing-requests", type=common.positive_int, default=None, metavar="N",
                        help="requests Ray hands one replica at once (default: --max-queue plus one batch)")
    on_ray.add_argument("--ray-max-queued-requests", type=common.positive_int, default=None, metavar="N",
                        help="requests Ray queues in front of the replicas; more get 429 with Retry-After "
                             "(default: --max-queue)")
    serve.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="info",
                       help="uvicorn's log level (info: one access-log line per request)")
    common.add_hub_options(serve)
    serve.set_defaults(run=run_serve)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0..65535, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def run_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import multipart  # noqa: F401  (python-multipart)
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UserError(f"seggpt-jax serve needs the serve extra ({e.name} is missing): pip install "
                        f"'seggpt-jax[serve]'") from None
    source = common.resolve_model_argument(args)
    if args.compilation_cache and args.no_compilation_cache:
        raise UserError("use either --compilation-cache DIR or --no-compilation-cache, not both")
    common.check_compilation_cache(args)
    from ..serve.engine import ServeSettings
    from ..serve.server import ListenError, ServeFailure, bind, serve

    settings = ServeSettings(
        model=source, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
        max_prompts=args.max_prompts, max_body_mb=args.max_body_mb, request_timeout_s=args.request_timeout_s,
        prompt_cache_mb=args.prompt_cache_mb, decode_threads=args.decode_threads or min(4, os.cpu_count() or 1),
        ensemble_mode=args.ensemble_mode)
    try:
        sock = bind(args.host, args.port)  # before anything loads: a taken port fails at once
    except ListenError as e:
        raise UserError(str(e)) from None
    cache = None if args.no_compilation_cache else (args.compilation_cache or True)
    if args.ray:
        return _run_on_ray(args, settings, cache, sock)

    def load():
        from ..inference.segmenter import Segmenter

        import jax.numpy as jnp

        # float32: the library's defaults, so that answers equal Segmenter.from_pretrained(MODEL)'s
        options = {} if args.dtype == "float32" else {"dtype": jnp.dtype(args.dtype)}
        model = common.load_model(args, source, **options)
        return Segmenter(model, ensemble_mode=args.ensemble_mode, compilation_cache=cache, devices=args.devices)

    try:
        return serve(settings, load, sock=sock, log_level=args.log_level,
                     on_listening=lambda url: status(f"listening on {url} (warming up: /readyz says when ready)"))
    except ServeFailure as e:
        raise UserError(f"cannot serve {source}: {e}") from None
    finally:
        sock.close()


def _run_on_ray(args: argparse.Namespace, settings, cache, sock) -> int:
    """``serve --ray``: the service as a Ray Serve application, until Ctrl-C or SIGTERM."""
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise UserError(f"seggpt-jax serve --ray needs the ray extra ({e.name} is missing): pip install "
                        f"'seggpt-jax[ray]'") from None
    import signal

    from ..serve.ray import deployment

    host, port = sock.getsockname()[:2]
    sock.close()  # checked free; Ray's proxy binds it
    actor: dict = {}
    if args.ray_gpus_per_replica:
        actor["num_gpus"] = args.ray_gpus_per_replica
    if args.ray_tpus_per_replica:
        actor["resources"] = {"TPU": args.ray_tpus_per_replica}
    ray.init(address=args.ray_address, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    application = deployment(settings, dtype=args.dtype, devices=args.devices, num_replicas=args.ray_replicas,
                             ray_actor_options=actor, max_ongoing_requests=args.ray_max_ongoing_requests,
                             max_queued_requests=args.ray_max_queued_requests, compilation_cache=cache or False)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    status(f"Ray Serve: {args.ray_replicas} replica(s) of {settings.model} on http://{host}:{port} (warming up: /readyz "
           f"says when ready; Ctrl-C or SIGTERM stops)")
    try:
        serve.run(application, name="seggpt-jax", route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        status("stopping the Ray Serve application ...")
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
