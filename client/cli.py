"""python -m client: multi-camera inspection against one or more Triton servers (see docs/client.md)."""
from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from typing import Callable, Sequence

from mrkd.core.files import user_path
from mrkd.core.wire import RAW_MODEL_SUFFIX

from .events import Observers
from .frame_queue import DROP_POLICIES
from .inspection import DEFAULT_RETRY_TIMEOUT, ENCODINGS, TRANSPORTS, InspectionClient
from .mqtt_cli import MqttError, add_mqtt_arguments, mqtt_options, start_publisher
from .plant import PlantError, load_plant
from .products import ProductLine, UnknownProduct, check_products, close_lines, open_lines, served_models
from .progress import Progress, print_summary
from .results import JsonlWriter
from .runner import DEFAULT_SPOOL_WAIT, CameraPlan, MultiCameraRunner, RunOptions
from .servers import NoServerReady, ServerPool, canonical_url
from .settings import DEFAULT_PRODUCT, apply_plant, camera_specs, products, typed_flags
from .sources import SourceError, SourceOptions, open_source, parse_camera
from .spool import DEFAULT_SPOOL_MB, Spool

EXIT_OK = 0  # every frame read was answered (or dropped by the drop policy) and no camera gave up
EXIT_FAILED = 1  # could not start: no server ready, a source that cannot be opened, an output that cannot be written
EXIT_USAGE = 2
EXIT_ERRORS = 3  # finished, but errors or invalid scores were recorded, or a camera gave up (see the summary)
EXIT_INTERRUPTED = 130  # stopped with Ctrl-C (the output is complete for every frame read)

EXAMPLES = """\
examples:
  # a whole plant from one file (examples/plant.toml): servers, cameras each with its product, outputs, MQTT;
  # a flag given with --config overrides the file (here: every camera replays its folder at 5 fps)
  python -m client --config plant.toml
  python -m client --config plant.toml --fps 5 --loop --out trial.jsonl --overwrite

  # two products on the same servers: each camera's frames go to its own product's ensemble (NAME@PRODUCT=SOURCE)
  python -m client --url 127.0.0.1:8001 --camera press1@press_line=images/press1 \\
      --camera weld1@weld_cell=rtsp://10.0.0.30/stream1 --out results.jsonl

  # two folders of images, each played once in name order, against one server
  python -m client --url 127.0.0.1:8001 --camera line1=images/line1 --camera line2=images/line2 --out results.jsonl

  # a folder replayed as a live 10 fps camera, a video file and an RTSP camera, spread over two servers,
  # heat-map overlays of anomalous frames saved; stop with Ctrl-C
  python -m client --url 10.0.0.5:8001 --url 10.0.0.6:8001 --loop --fps 10 \\
      --camera cam1=images/line1 --camera cam2=belt.mp4 --camera cam3=rtsp://10.0.0.20/stream1 \\
      --out results.jsonl --save-heatmaps heatmaps/

  # four synthetic cameras (crops of real texture photos, every 4th with a pasted defect) for one minute
  python -m client --url 127.0.0.1:8001 --loop --duration 60 --out bench.jsonl \\
      --camera a=synthetic: --camera b=synthetic:texture=grass --camera c=synthetic:texture=gravel,size=128 \\
      --camera d=synthetic:seed=3

  # the live page of every camera and Prometheus metrics while it runs: http://127.0.0.1:8080/ and /metrics
  python -m client --url 127.0.0.1:8001 --loop --fps 10 --camera a=synthetic: --camera b=images/line1 \\
      --out results.jsonl --dashboard 127.0.0.1:8080

  # same host as the server: raw frames through Triton system shared memory (no JPEG encode/decode)
  python -m client --url 127.0.0.1:8001 --transport shm --camera cam1=images/line1 --out results.jsonl

  # Triton replicas behind a Kubernetes headless Service: every address the name resolves to is a server; the
  # name is looked up again every 5 s and after a failure, so replicas that come and go join and leave the pool
  python -m client --url dns:///triton-grpc.inspection.svc.cluster.local:8001 --loop --fps 10 \\
      --camera cam1=rtsp://10.0.0.20/stream1 --out results.jsonl

  # IP cameras that may drop out: reopen a lost stream up to 10 times (backoff 0.5 s doubling to 10 s)
  python -m client --url 127.0.0.1:8001 --camera gate=rtsp://10.0.0.21/stream1 --reconnect 10 --out gate.jsonl

  # a page other machines can open: credentials from the environment (docs/dashboard.md)
  MRKD_DASHBOARD_USER=line3 MRKD_DASHBOARD_PASSWORD=... python -m client --url 127.0.0.1:8001 \
      --camera cam1=images/line1 --loop --fps 10 --out results.jsonl --dashboard 0.0.0.0:8080

  # frames left in the spool by a run that ended during an outage: inspected first (status "late")
  python -m client --url 127.0.0.1:8001 --camera cam1=images/line1 --out results2.jsonl --spool results.jsonl.spool

SOURCE is a folder of images, a video file, an rtsp:// or http(s):// stream (OpenCV), or
synthetic:[texture=brick|grass|gravel][,size=PIXELS][,count=N][,defect_every=K][,seed=S].
Every frame read gets exactly one line in --out: status "ok" (score, verdict, server, latency), "invalid_score"
(the server's score was not a number: verdict "anomalous"), "late" (waited longer than --retry-timeout, kept in
the spool and inspected once a server was back: capture_time and inspected_time), "spooled" (still in the spool
when the run ended: the next run with that --spool inspects it), "dropped" (drop_reason) or "error" (error). A lost
stream adds a "gap" line when it is back, and a "gave_up" line when the camera gives up. --out and earlier heat
maps are never replaced unless --overwrite; two clients cannot share an --out or a --spool. Stream credentials
(user:password@, password=, token=) are never written or shown. Exit status: 0 done, 1 could not start, 2 bad
arguments, 3 done but errors or invalid scores were recorded, frames were left in the spool or a camera gave up,
130 Ctrl-C.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `python -m client` (flags, help, examples)."""
    parser = argparse.ArgumentParser(
        prog="python -m client",
        description="Send camera frames to the MRKD Triton ensemble over gRPC and record a verdict for every frame.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=user_path, default=None, metavar="PLANT.toml",
                        help="the plant file (examples/plant.toml): servers, cameras and their products, outputs; "
                             "flags given with it override the file")
    parser.add_argument("--url", action="append", metavar="HOST:PORT|dns:///NAME:PORT",
                        help="Triton gRPC endpoint; repeat to spread requests over several servers. dns:///NAME:PORT "
                             "(or dns://DNSHOST[:DNSPORT]/NAME:PORT to ask that DNS server): every address behind "
                             "NAME is a server, found again as replicas come and go (docs/kubernetes.md)")
    parser.add_argument("--model", default=DEFAULT_PRODUCT,
                        help="the product (ensemble name) of cameras that name none (default: %(default)s)")
    parser.add_argument("--camera", action="append", metavar="NAME[@PRODUCT]=SOURCE",
                        help="a camera: NAME (letters, digits, _ . -), the PRODUCT whose ensemble inspects its frames "
                             "(default: --model) and its SOURCE; repeat for more cameras")
    parser.add_argument("--out", type=user_path,
                        help="results file, one JSON line per frame; an existing file is refused (see --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    source = parser.add_argument_group("sources")
    source.add_argument("--loop", action="store_true", help="replay folders, video files and synthetic sequences")
    source.add_argument("--fps", type=float, default=None,
                        help="pace every camera at this frame rate, as a live camera (default: as fast as read)")
    source.add_argument("--max-frames", type=int, default=None, help="stop each camera after this many frames")
    source.add_argument("--duration", type=float, default=None, help="stop after this many seconds (as Ctrl-C)")
    source.add_argument("--reconnect", type=int, default=0, metavar="N",
                        help="reopen a lost stream up to N times, with backoff (0.5 s doubling to 10 s); each gap is "
                             "a line in --out; a camera that cannot be brought back gives up (default: 0)")

    flow = parser.add_argument_group("requests")
    flow.add_argument("--max-in-flight", type=int, default=4, help="requests in flight per camera (default: 4)")
    flow.add_argument("--queue-size", type=int, default=None,
                      help="frames waiting per camera before a live camera drops (default: --max-in-flight)")
    flow.add_argument("--drop-policy", choices=DROP_POLICIES, default="oldest",
                      help="when a live camera's queue is full, drop the oldest queued frame or the newest frame "
                           "(default: %(default)s)")
    flow.add_argument("--encoding", choices=ENCODINGS, default="jpeg", help="image encoding for --transport bytes")
    flow.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality 1-100 (default: %(default)s)")
    flow.add_argument("--transport", choices=TRANSPORTS, default="bytes",
                      help="bytes: encoded images (any host); raw: decoded frames; shm: decoded frames in system "
                           "shared memory (client on the server's host)")
    flow.add_argument("--raw-model", default=None,
                      help="raw-frame entry point for --transport raw/shm (default: MODEL_raw)")
    flow.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default: %(default)s)")
    flow.add_argument("--retry-timeout", type=float, default=DEFAULT_RETRY_TIMEOUT,
                      help="seconds a frame waits for a ready server (after a server failed it, or while none is "
                           "ready) before it goes to the spool (--no-spool: is recorded as an error) "
                           "(default: %(default)s)")
    flow.add_argument("--spool", type=user_path, default=None, metavar="DIR",
                      help="where frames that waited --retry-timeout wait for a server, on disk (inspected later, "
                           "status late; what a run leaves there is inspected by the next run given DIR) "
                           "(default: --out with .spool appended)")
    flow.add_argument("--spool-size", type=float, default=DEFAULT_SPOOL_MB, metavar="MB",
                      help="the spool's bound: beyond it the oldest frames are evicted, each recorded as dropped "
                           "(default: %(default)g)")
    flow.add_argument("--spool-wait", type=float, default=DEFAULT_SPOOL_WAIT, metavar="S",
                      help="when the sources ended: how long to wait for a ready server to inspect what is in the "
                           "spool before leaving it for the next run (default: %(default)g)")
    flow.add_argument("--no-spool", action="store_true", help="no spool: a frame that waited is an error")
    flow.add_argument("--probe-interval", type=float, default=1.0,
                      help="seconds between health checks of every server (default: %(default)s)")
    flow.add_argument("--resolve-interval", type=float, default=5.0,
                      help="seconds between DNS lookups of dns: URLs (sooner after a failure; default: %(default)s)")
    flow.add_argument("--wait-ready", type=float, default=30.0,
                      help="seconds to wait at start for a ready server (default: %(default)s)")
    flow.add_argument("--shutdown-timeout", type=float, default=10.0,
                      help="seconds to wait for answers in flight when stopping (default: %(default)s)")

    output = parser.add_argument_group("output")
    output.add_argument("--save-heatmaps", type=user_path, default=None, metavar="DIR",
                        help="write heat-map overlay PNGs of anomalous frames to DIR/<camera>/")
    output.add_argument("--progress", choices=("auto", "rich", "plain", "none"), default="auto",
                        help="live per-camera progress on stderr (auto: rich on a terminal if installed)")
    output.add_argument("--progress-interval", type=float, default=None,
                        help="seconds between progress updates (default: 1 on a terminal, 10 in a log)")
    output.add_argument("--dashboard", default=None, metavar="HOST:PORT",
                        help="serve the live page of every camera (/) and Prometheus metrics (/metrics) there while "
                             "the client runs, e.g. 127.0.0.1:8080 (port 0: any free port; docs/dashboard.md)")
    output.add_argument("--keep-open", action="store_true",
                        help="with --dashboard: keep the page up after the run until Ctrl-C")
    add_mqtt_arguments(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parsed and checked arguments, with the plant file's settings (--config) where no flag was typed;
    `args.camera` is the list of CameraSpec. A bad argument or plant file exits with status 2 and a message
    naming it."""
    parser = build_parser()
    args = parser.parse_args(argv)
    typed = typed_flags(parser, argv)
    plant = None
    if args.config is not None:
        try:
            plant = load_plant(args.config)
        except PlantError as exc:
            parser.exit(EXIT_USAGE, f"error: {exc}\n")
        apply_plant(args, plant, typed)
    try:
        args.url = [canonical_url(u) for u in args.url or []]
        args.camera = [parse_camera(c) for c in args.camera or []]
        args.camera = camera_specs(args, typed, plant)
        RunOptions(args.max_in_flight, args.queue_size, args.drop_policy, None, args.shutdown_timeout,
                   args.max_frames, args.duration)
    except (ValueError, SourceError) as exc:
        parser.error(str(exc))
    for flag, given in (("--url", args.url), ("--camera", args.camera), ("--out", args.out)):
        if not given:
            parser.error(f"{flag} is required (or a plant file that gives it: --config)")
    if len({c.name for c in args.camera}) != len(args.camera):
        parser.error("camera names must be unique")
    if len(set(args.url)) != len(args.url):
        parser.error("the same --url is given twice")
    if args.raw_model is not None and len(products(args.camera)) > 1:
        parser.error("--raw-model names one product's entry point; the cameras inspect several products "
                     f"({', '.join(products(args.camera))}): leave it out (each uses PRODUCT_raw)")
    if args.fps is not None and args.fps <= 0:
        parser.error(f"--fps must be positive, got {args.fps}")
    if not 1 <= args.jpeg_quality <= 100:
        parser.error(f"--jpeg-quality must be between 1 and 100, got {args.jpeg_quality}")
    if args.dashboard is not None:
        from .dashboard import parse_address

        try:
            args.dashboard = parse_address(args.dashboard)
        except ValueError as exc:
            parser.error(str(exc))
    elif args.keep_open:
        parser.error("--keep-open needs --dashboard")
    args.mqtt = mqtt_options(parser, args)
    for name in ("timeout", "probe_interval", "progress_interval", "resolve_interval"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.retry_timeout < 0:
        parser.error(f"--retry-timeout must not be negative, got {args.retry_timeout}")
    if args.reconnect < 0:
        parser.error(f"--reconnect must not be negative, got {args.reconnect}")
    if args.spool_wait < 0:
        parser.error(f"--spool-wait must not be negative, got {args.spool_wait}")
    if args.spool_size <= 0:
        parser.error(f"--spool-size must be positive, got {args.spool_size}")
    if args.no_spool and args.spool is not None:
        parser.error("--spool and --no-spool contradict each other")
    if not args.no_spool and args.spool is None:
        args.spool = args.out.with_name(args.out.name + ".spool")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the client; returns the exit status (see EXAMPLES)."""
    args = parse_args(argv)
    with contextlib.ExitStack() as resources:  # whatever was opened is closed however main ends
        return _run(args, resources)


def _once(close: Callable[[], None]) -> Callable[[], None]:
    """`close`, run by the first call only."""
    done = []

    def once() -> None:
        if not done:
            done.append(True)
            close()
    return once


def _refuse(message: str, status: int = EXIT_FAILED) -> int:
    print(f"error: {message}", file=sys.stderr)
    return status


def _run(args: argparse.Namespace, resources: contextlib.ExitStack) -> int:
    if not args.overwrite and args.out.is_file() and args.out.stat().st_size > 0:
        return _refuse(f"{args.out} already exists; pass --overwrite to replace it, or choose another --out")
    if args.save_heatmaps is not None:
        from .results import earlier_heatmaps

        earlier = earlier_heatmaps(args.save_heatmaps, [c.name for c in args.camera])
        if earlier and not args.overwrite:
            return _refuse(f"{args.save_heatmaps} already holds {len(earlier)} heat maps of these cameras from an "
                           f"earlier run (e.g. {earlier[0]}); pass --overwrite to replace them, or choose another "
                           "--save-heatmaps")
        for path in earlier:  # --overwrite: the folder holds this run's heat maps only
            path.unlink()
    try:
        cameras = [(c.name, open_source(c.source, SourceOptions(loop=c.loop, fps=c.fps, reconnect=c.reconnect)))
                   for c in args.camera]
    except SourceError as exc:
        return _refuse(str(exc))
    for (name, source), spec in zip(cameras, args.camera):
        print(f"camera {name} ({spec.product}): {source.description}{' (live)' if source.live else ''}",
              file=sys.stderr)
    spool = None
    if args.spool is not None:
        try:
            spool = Spool(args.spool, int(args.spool_size * 1024 * 1024))
        except (OSError, ValueError) as exc:
            return _refuse(f"spool {args.spool}: {exc}")
        resources.callback(spool.close)
        if spool.resumed:
            print(f"spool {args.spool}: {spool.resumed} frames left by an earlier run, inspected first (status late)",
                  file=sys.stderr)

    publisher = None
    if args.mqtt is not None:  # the broker first: it is checked without a server
        try:
            publisher = start_publisher(args.mqtt, {c.name: c.product for c in args.camera})
        except MqttError as exc:
            return _refuse(str(exc))
        close_publisher = _once(publisher.close)  # at exit, or after the run (its summary needs it closed)
        resources.callback(close_publisher)

    lines = open_lines(products(args.camera), lambda product: _product_line(args, product))
    resources.callback(close_lines, lines)  # (after the runner: closed before the spool)
    first = next(iter(lines.values()))
    try:  # a product no server knows is a mistake in the arguments or the plant file: refused before streaming
        check_products(served_models(first.pool, args.wait_ready), {c.name: c.product for c in args.camera},
                       lambda product: lines[product].client.target_model)
    except UnknownProduct as exc:
        return _refuse(str(exc), EXIT_USAGE)
    except NoServerReady as exc:
        return _refuse(str(exc))
    dashboard = None
    if args.dashboard is not None:
        from .dashboard import Dashboard, DashboardError

        try:
            dashboard = Dashboard(*args.dashboard, cameras, spool=spool, pools={p: line.pool for p, line in
                                  lines.items()}, products={c.name: c.product for c in args.camera})
            print(f"dashboard: {dashboard.start()}  metrics: {dashboard.url}metrics", file=sys.stderr, flush=True)
        except DashboardError as exc:
            return _refuse(str(exc))
        resources.callback(dashboard.stop)
    for product, line in lines.items():
        try:
            ready = line.pool.wait_until_ready(args.wait_ready)
        except NoServerReady as exc:
            return _refuse(str(exc))
        print(f"servers ready{f' for {product}' if len(lines) > 1 else ''}: {', '.join(s.url for s in ready)} of "
              f"{len(line.pool.servers)}", file=sys.stderr)
    for line in lines.values():
        line.pool.start()

    run_options = RunOptions(
        max_in_flight=args.max_in_flight, queue_size=args.queue_size, drop_policy=args.drop_policy,
        heatmap_dir=args.save_heatmaps, shutdown_timeout=args.shutdown_timeout, max_frames=args.max_frames,
        duration=args.duration, retry_timeout=args.retry_timeout, spool=spool, spool_wait=args.spool_wait,
    )
    try:
        writer = JsonlWriter(args.out, overwrite=args.overwrite)
    except (OSError, ValueError) as exc:
        return _refuse(f"cannot write {args.out}: {exc}")
    if dashboard is not None and publisher is not None:
        publisher.attach(dashboard.state)
    observers = [o for o in (dashboard.state if dashboard else None, publisher) if o is not None]
    plans = [(name, source, CameraPlan(lines[c.product].client, c.max_in_flight, c.queue_size, c.drop_policy))
             for (name, source), c in zip(cameras, args.camera)]
    runner = MultiCameraRunner(plans, first.client, writer, run_options, observer=Observers(observers))
    progress = Progress(runner.stats, args.progress, args.progress_interval)
    interrupts = 0

    def on_interrupt(signum, frame) -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1:
            print("\nstopping: recording queued frames and waiting for answers in flight (Ctrl-C again: don't wait)",
                  file=sys.stderr, flush=True)
            runner.stop()
        else:
            runner.abort()

    previous_int = signal.signal(signal.SIGINT, on_interrupt)
    previous_term = signal.signal(signal.SIGTERM, on_interrupt)
    try:
        progress.start()
        summaries = runner.run()
    finally:
        progress.stop()
        signal.signal(signal.SIGINT, previous_int)
        signal.signal(signal.SIGTERM, previous_term)
        writer.close()
        close_lines(lines)
        if spool is not None:
            spool.close()
        if dashboard is not None:
            dashboard.finish()
        if publisher is not None:
            close_publisher()
    print_summary(summaries)
    for line in publisher.summary_lines() if publisher is not None else ():
        print(line, file=sys.stderr)
    print(f"{writer.lines} lines written to {args.out}", file=sys.stderr)
    troubled = [s for s in summaries if s["errors"] or s["invalid"] or s["failure"] or s["spooled"]]
    for s in troubled:
        what = [f"{s['errors']} errors" if s["errors"] else "",
                f"{s['invalid']} invalid scores" if s["invalid"] else "",
                f"{s['spooled']} left in the spool {args.spool}" if s["spooled"] else "",
                f"gave up: {s['failure']}" if s["failure"] else ""]
        print(f"camera {s['camera']}: {', '.join(w for w in what if w)}", file=sys.stderr)
    if dashboard is not None and args.keep_open:
        print(f"dashboard still at {dashboard.url} (Ctrl-C to close)", file=sys.stderr, flush=True)
        wait_for_interrupt()
    if interrupts:
        return EXIT_INTERRUPTED
    return EXIT_ERRORS if troubled else EXIT_OK


def _product_line(args: argparse.Namespace, product: str) -> ProductLine:
    """The pool and client of one product (not started: the pool is probed once the products were checked)."""
    raw_model = args.raw_model or f"{product}{RAW_MODEL_SUFFIX}"
    pool = ServerPool(args.url, product if args.transport == "bytes" else raw_model, args.probe_interval,
                      probe_request_timeout=args.timeout, resolve_interval=args.resolve_interval,
                      on_change=lambda message: print(f"{product}: {message}", file=sys.stderr, flush=True))
    # The client gives the pool its health probe (a real inference) before the first probe runs.
    client = InspectionClient(
        pool, product, encoding=args.encoding, jpeg_quality=args.jpeg_quality, transport=args.transport,
        raw_model=raw_model, want_map=args.save_heatmaps is not None or args.dashboard is not None,
        timeout=args.timeout, retry_timeout=args.retry_timeout,
    )
    return ProductLine(product, pool, client)


def wait_for_interrupt() -> None:
    """Blocks until Ctrl-C or SIGTERM."""
    import threading

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
