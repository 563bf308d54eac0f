"""``ray start`` that keeps every Ray address on 127.0.0.1. Used by ``infra/local/services.py``.

Usage is exactly the ``ray`` CLI: ``python ray_loopback.py start --head --node-ip-address 127.0.0.1 ...``.

Why a wrapper: on Linux, Ray rewrites a loopback address to the machine's routable IP
(``ray._private.services.resolve_ip_for_localhost``), so ``ray start --node-ip-address 127.0.0.1``
still advertises e.g. 10.x.y.z, binds its agents there and its gRPC servers on 0.0.0.0. Ray's one switch
that keeps loopback (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) also forbids joining a second node. This
wrapper keeps the loopback address as given for this ``ray start`` process, so GCS, raylet, object
manager, dashboard and agents all listen on 127.0.0.1, and sets ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``
for the processes the node spawns (job drivers calling ``ray.init()``), so they resolve 127.0.0.1 too.

It patches one private Ray function; if a Ray upgrade removes it, this fails loudly instead of silently
binding to other interfaces.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    import ray._private.services as services

    if not callable(getattr(services, "resolve_ip_for_localhost", None)):
        sys.exit(
            "error: this Ray version has no ray._private.services.resolve_ip_for_localhost; "
            "infra/local/ray_loopback.py must be updated before the local stack can run"
        )
    services.resolve_ip_for_localhost = lambda host: host
    # Read by ray_constants at import time: this process has already imported it (so it may still join as
    # a worker node); children inherit the variable and answer 127.0.0.1 from get_node_ip_address().
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

    from ray.scripts.scripts import main as ray_main

    sys.argv[0] = "ray"
    ray_main()


if __name__ == "__main__":
    main()
