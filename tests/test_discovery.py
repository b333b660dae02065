"""Replicas found through DNS (client/discovery.py, ServerPool with dns: URLs): a real DNS server (dnslib) on
loopback answers a name with loopback addresses 127.0.0.x where real tritonservers listen, as Kubernetes' DNS
answers for the headless Service of deploy/kubernetes."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from datetime import datetime

import pytest
from conftest import export_encoded_only
from dns_zone import DnsServer
from manifests import REPO_ROOT, container_port, launch, ports_free, serve_command, stop, triton_container, wait_ready

from client.cli import parse_args
from client.discovery import ResolveError, parse_dns_url, resolve
from client.servers import ServerPool, canonical_url

NAME = "triton-grpc.inspection.test"


@pytest.mark.parametrize("url, canonical", [
    ("dns:///triton-grpc.inspection.svc.cluster.local:8001", "dns:///triton-grpc.inspection.svc.cluster.local:8001"),
    ("dns://10.96.0.10/triton-grpc.inspection.svc:8001", "dns://10.96.0.10:53/triton-grpc.inspection.svc:8001"),
    ("dns://127.0.0.1:5353/Triton.Test.:9001", "dns://127.0.0.1:5353/triton.test:9001"),
    ("dns:triton:8001", "dns:///triton:8001"),
    ("grpc://10.0.0.5:8001", "10.0.0.5:8001"),
])
def test_dns_urls_are_read_in_grpcs_form(url, canonical):
    assert canonical_url(url) == canonical


@pytest.mark.parametrize("url, message", [
    ("dns:///triton-grpc.inspection.svc", "give the name and Triton's gRPC port"),
    ("dns:///triton:0", "give the name and Triton's gRPC port"),
    ("dns://10.96.0.10:99999/triton:8001", "out of range"),
    ("dns://10.96.0.10", "three slashes"),
    ("dns:///bad name:8001", "is not a DNS name"),
    ("dns://a b/triton:8001", "is not HOST[:PORT]"),
])
def test_bad_dns_urls_name_the_problem(url, message, capsys):
    with pytest.raises(ValueError, match=re.escape(message)):
        canonical_url(url)
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--url", url, "--camera", "a=synthetic:", "--out", "x.jsonl"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_same_replica_named_twice_is_refused():
    with pytest.raises(ValueError, match="given twice"):
        ServerPool(["dns:///triton:8001", "dns:triton:8001"], "mrkd")


def test_resolve_asks_the_named_dns_server_for_every_address():
    with DnsServer(NAME, ["127.0.0.3", "127.0.0.2"]) as dns:
        target = parse_dns_url(f"dns://127.0.0.1:{dns.port}/{NAME}:8001")
        assert resolve(target) == ["127.0.0.2:8001", "127.0.0.3:8001"]
        dns.zone.set(["127.0.0.4"])
        assert resolve(target) == ["127.0.0.4:8001"]
        with pytest.raises(ResolveError, match="has no address"):
            resolve(parse_dns_url(f"dns://127.0.0.1:{dns.port}/other.test:8001"))
        assert dns.zone.queries >= 6  # A and AAAA per lookup: the answers came from this server
    with pytest.raises(ResolveError, match="did not answer"):
        resolve(target, timeout=0.5)  # the DNS server is gone


def test_pool_adds_and_drops_replicas_as_the_answers_change_and_keeps_them_when_a_lookup_fails():
    """No tritonserver here: which servers the pool holds, not their health (the scale test below does both)."""
    changes: list[str] = []
    with DnsServer(NAME, ["127.0.0.2", "127.0.0.3"]) as dns:
        url = f"dns://127.0.0.1:{dns.port}/{NAME}:8001"
        with ServerPool([url, "127.0.0.9:8001"], "mrkd", probe_interval=0, on_change=changes.append) as pool:
            assert [s.url for s in pool.servers] == ["127.0.0.9:8001", "127.0.0.2:8001", "127.0.0.3:8001"]
            gone = pool.servers[1]
            gone.ready = True  # as a passed probe would set it; one request is then in flight on it
            assert pool.acquire(exclude=[pool.servers[0]]) is gone and gone.in_flight == 1
            dns.zone.set(["127.0.0.3", "127.0.0.4"])
            assert pool.resolve() == (["127.0.0.4:8001"], ["127.0.0.2:8001"])
            assert [s.url for s in pool.servers] == ["127.0.0.9:8001", "127.0.0.3:8001", "127.0.0.4:8001"]
            assert gone.retired and not gone.ready
            assert changes == [f"{url}: added 127.0.0.2:8001", f"{url}: added 127.0.0.3:8001",
                               f"{url}: added 127.0.0.4:8001",
                               f"{url}: dropped 127.0.0.2:8001 (1 requests still in flight there)"]
            pool.release(gone)  # the request in flight on the dropped replica still ends normally
            assert gone.in_flight == 0
            dns.zone.set([])  # NXDOMAIN-like empty answer: a DNS hiccup must not empty the pool
            assert pool.resolve() == ([], [])
            assert len(pool.servers) == 3
            assert "has no address" in pool.resolve_errors[url] and "has no address" in pool.last_errors()


def test_a_failed_request_makes_the_pool_look_the_name_up_again_long_before_the_interval():
    with DnsServer(NAME, ["127.0.0.2"]) as dns:
        url = f"dns://127.0.0.1:{dns.port}/{NAME}:8001"
        with ServerPool([url], "mrkd", probe_interval=0, probe_timeout=0.5, resolve_interval=600) as pool:
            pool.start()  # the resolve thread (no probe threads: probe_interval 0)
            server = pool.servers[0]
            server.ready = True
            assert pool.acquire() is server
            dns.zone.set(["127.0.0.3"])  # the replica was replaced
            queries = dns.zone.queries
            time.sleep(1.0)
            assert dns.zone.queries == queries  # nothing asks before the interval without a failure
            pool.release(server, failed=True, error="UNAVAILABLE")
            deadline = time.monotonic() + 5
            while [s.url for s in pool.servers] != ["127.0.0.3:8001"] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert [s.url for s in pool.servers] == ["127.0.0.3:8001"] and server.retired


def test_ties_are_broken_in_turn_so_every_ready_replica_gets_an_equal_share():
    """Two cameras send at the same moment: the first request sees three idle replicas, the second two. A turn counter
    shared by ties of different sizes gave the three 1/6, 2/6 and 3/6 of the frames (seen in the scale run)."""
    with ServerPool(["127.0.0.2:8001", "127.0.0.3:8001", "127.0.0.4:8001"], "mrkd", probe_interval=0) as pool:
        for server in pool.servers:
            server.ready = True
        for _ in range(300):
            first, second = pool.acquire(), pool.acquire()
            pool.release(first)
            pool.release(second)
        assert [s.requests for s in pool.servers] == [200, 200, 200]


# ------------------------------------------------------------------------------------------------ real replicas

REPLICAS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]


def _seconds(record: dict) -> float:
    return datetime.fromisoformat(record["capture_time"]).timestamp()


def _shares(records: list[dict], start: float, end: float) -> dict[str, float]:
    chosen = [r["server"] for r in records if start <= _seconds(r) < end]
    return {server: round(chosen.count(server) / len(chosen), 3) for server in sorted(set(chosen))}


@pytest.mark.triton
@pytest.mark.slow
def test_replicas_scale_from_2_to_3_and_back_to_1_through_dns_mid_run_and_every_frame_is_answered(
        tiny_checkpoint, tmp_path):
    """Three real tritonservers run `python -m mrkd.serve` exactly as the Deployment runs it, on 127.0.0.2-4 with the
    manifest's ports. The DNS name answers 2 of them, then 3 (the new one must take a share within seconds), then 1
    (the two removed get SIGTERM at once, as Kubernetes sends it): the real client (`python -m client --url dns://...`,
    two 6 fps cameras) answers every frame read, with no error, drop or loss."""
    container = triton_container()
    grpc_port = container_port(container, "grpc")
    ports = [container_port(container, name) for name in ("grpc", "http", "metrics")]
    for host in REPLICAS:
        if reason := ports_free(host, ports):
            pytest.skip(reason)
    repo = tmp_path / "model_repository"
    export_encoded_only(tiny_checkpoint, repo, name="mrkd", max_queue_delay_us=5000)
    servers = {host: launch(serve_command(container, repo, host), tmp_path / f"triton-{host}.log")
               for host in REPLICAS}
    try:
        for process in servers.values():
            wait_ready(process)
        a, b, c = (f"{host}:{grpc_port}" for host in REPLICAS)
        out = tmp_path / "results.jsonl"
        with DnsServer(NAME, REPLICAS[:2]) as dns:
            url = f"dns://127.0.0.1:{dns.port}/{NAME}:{grpc_port}"
            client = subprocess.Popen(
                [sys.executable, "-m", "client", "--url", url, "--resolve-interval", "1", "--probe-interval", "0.5",
                 "--camera", "cam1=synthetic:size=96", "--camera", "cam2=synthetic:texture=grass,size=96,seed=2",
                 "--loop", "--fps", "6", "--duration", "45", "--out", str(out), "--progress", "none"],
                cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True)
            log: list[tuple[float, str]] = []
            ready_seen = threading.Event()

            def read_log() -> None:
                for line in client.stderr:
                    log.append((time.time(), line.rstrip()))
                    if line.startswith("servers ready"):
                        ready_seen.set()

            reader = threading.Thread(target=read_log, daemon=True)
            reader.start()
            assert ready_seen.wait(120), log
            start = time.time()
            time.sleep(12)
            dns.zone.set(REPLICAS)  # scale up: a third replica appears
            added_at = time.time()
            time.sleep(14)
            dns.zone.set(REPLICAS[:1])  # scale down to one: the other two leave DNS and are terminated
            dropped_at = time.time()
            for host in REPLICAS[1:]:
                threading.Thread(target=stop, args=(servers[host],), daemon=True).start()
            code = client.wait(timeout=180)
            reader.join(timeout=10)
            end = time.time()
    finally:
        for process in servers.values():
            stop(process)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    messages = [text for _, text in log]
    frames = {}
    for record in records:
        frames.setdefault(record["camera"], []).append(record["frame"])
    read = {camera: max(indices) + 1 for camera, indices in frames.items()}
    statuses = {status: sum(r["status"] == status for r in records) for status in {r["status"] for r in records}}
    lost = sum(read.values()) - len({(r["camera"], r["frame"]) for r in records})
    first_c = min((_seconds(r) for r in records if r.get("server") == c), default=float("inf"))
    before, during, after = (_shares(records, start, added_at), _shares(records, added_at + 5, dropped_at),
                             _shares(records, dropped_at + 3, end))
    retried = [(r["camera"], r["frame"], r["server"], r["attempts"]) for r in records if r.get("attempts", 1) > 1]
    print(f"\nframes read {sum(read.values())} ({read}), lines {len(records)}, statuses {statuses}, lost {lost}")
    print(f"answered after a failed send (camera, frame, server, attempts): {retried}")
    print(f"shares: 2 replicas {before}; 3 replicas (from 5 s after the change) {during}; "
          f"1 replica (from 3 s after) {after}")
    print(f"new replica {c}: first frame answered {first_c - added_at:.1f} s after it appeared in DNS")
    print("client log:", *[m for m in messages if "added" in m or "dropped" in m or "ready" in m
                            or m.lstrip().startswith(("camera", "cam1", "cam2"))], sep="\n  ")
    assert code == 0, messages
    assert lost == 0 and all(sorted(i) == list(range(len(i))) for i in frames.values())  # one line per frame read
    assert statuses == {"ok": len(records)}, [r for r in records if r["status"] != "ok"]
    assert sum(read.values()) >= 2 * 6 * 35  # two 6 fps cameras for most of 45 s
    assert set(before) == {a, b} and min(before.values()) > 0.3
    assert first_c - added_at < 6.0  # resolve interval 1 s + the probe (health check and one real inference)
    assert set(during) == {a, b, c} and min(during.values()) > 0.2
    assert after == {a: 1.0}
    assert f"mrkd: {url}: added {c}" in messages and f"mrkd: {url}: dropped {b}" in messages  # product: change
