"""Container HEALTHCHECK: exit 0 when GET /health answers 200, 1 otherwise.

The runtime image has no curl; this uses only the standard library. Port and host come from the same environment
variables the server reads (STATICMOE_PORT, STATICMOE_HEALTH_HOST), so a changed port needs no image rebuild.
"""

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    # an empty variable counts as unset, as the server reads it (compose's ${X:-}, a Kubernetes value "")
    host = os.environ.get("STATICMOE_HEALTH_HOST") or "127.0.0.1"
    port = os.environ.get("STATICMOE_PORT") or "8000"
    url = f"http://{host}:{port}/health"
    try:
        with urllib.request.urlopen(url, timeout=float(os.environ.get("STATICMOE_HEALTH_TIMEOUT") or "4")) as response:
            healthy = response.status == 200
    except (urllib.error.URLError, OSError, ValueError) as err:  # 503 raises HTTPError (a URLError), refused too
        print(f"unhealthy: {url}: {err}", file=sys.stderr)
        return 1
    if not healthy:
        print(f"unhealthy: {url} answered {response.status}", file=sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
