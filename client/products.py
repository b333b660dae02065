"""A product per camera: each product (the name of its Triton ensemble) gets its own ServerPool and InspectionClient
over the same servers.

So readiness, failover and retries are per product: a server whose model for a product is not ready (not loaded
there, failing) is no candidate for that product's frames, while it serves the others; the least-loaded choice
and the retry policy (servers.py, inspection.py) run among the servers ready for that product.

Before anything streams, `check_products` asks the servers for their model repository index and refuses a product
that none of them knows, naming the camera, the product and what the servers do serve.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from mrkd.core.errors import OptionError
from mrkd.core.wire import ROLE_SUFFIX

from .inspection import InspectionClient
from .servers import NoServerReady, ServerPool


class UnknownProduct(OptionError):
    """A camera's product is a model none of the servers has (a usage error: exit 2)."""


@dataclass
class ProductLine:
    """One product's pool and client."""

    product: str
    pool: ServerPool
    client: InspectionClient
    closed: bool = False

    def close(self) -> None:
        """Closes the client, then the pool (once; a second call does nothing)."""
        if not self.closed:
            self.closed = True
            self.client.close()
            self.pool.close()


def open_lines(products: Sequence[str], make: Callable[[str], ProductLine]) -> dict[str, ProductLine]:
    """product -> its ProductLine, made by `make(product)`; what was made is closed if one fails."""
    lines: dict[str, ProductLine] = {}
    try:
        for product in products:
            lines[product] = make(product)
    except BaseException:
        close_lines(lines)
        raise
    return lines


def close_lines(lines: Mapping[str, ProductLine]) -> None:
    """Closes every product's client and pool."""
    for line in lines.values():
        line.close()


def served_models(pool: ServerPool, timeout: float) -> dict[str, set[str]]:
    """url -> the names in that server's model repository index, for every server that answers within `timeout`
    seconds (asked again every 0.5 s until one answers); raises NoServerReady when none does."""
    deadline = time.monotonic() + timeout
    errors: dict[str, str] = {}
    while True:
        answers: dict[str, set[str]] = {}
        for server in list(pool.servers):
            try:
                index = server.connection.get_model_repository_index(as_json=True, client_timeout=pool.probe_timeout)
                answers[server.url] = {model["name"] for model in index.get("models", [])}
            except Exception as exc:  # unreachable now: asked again below while time is left
                errors[server.url] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
        if answers:
            return answers
        if time.monotonic() >= deadline:
            details = "; ".join(f"{url}: {error}" for url, error in errors.items()) or "no server found"
            raise NoServerReady(f"no server answered within {timeout:g} s ({details})")
        time.sleep(0.5)


def products_of(models: set[str]) -> list[str]:
    """The products in a repository index: the names that are not another name plus a role suffix (the detector,
    preprocess, ... steps of a product's ensemble)."""
    suffixes = [suffix for suffix in ROLE_SUFFIX.values() if suffix]
    return sorted(name for name in models
                  if not any(name.endswith(s) and name[: -len(s)] in models for s in suffixes))


def check_products(served: Mapping[str, set[str]], wanted: Mapping[str, str],
                   target: Callable[[str], str]) -> None:
    """wanted: camera -> product; target(product): the model its frames go to (the ensemble, or its raw-frame
    entry point). Raises UnknownProduct for the first camera whose model no server has."""
    everything = set().union(*served.values()) if served else set()
    for camera, product in wanted.items():
        model = target(product)
        if model not in everything:
            what = f"product {product!r}" + (f" (model {model!r})" if model != product else "")
            known = ", ".join(products_of(everything)) or "no models"
            raise UnknownProduct(f"camera {camera}: {what} is not served by {', '.join(sorted(served))}; "
                                 f"they serve: {known}")
