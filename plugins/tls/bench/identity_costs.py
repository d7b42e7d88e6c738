"""What the identity service costs: a first certificate (join token), a renewal (mTLS), and
the signing alone inside the service.

    python plugins/tls/bench/identity_costs.py [--rounds 200] [--backend asyncio]

Client and service share one event loop and one core, so each figure is the whole exchange:
key pair, CSR, TLS handshake on loopback, request, checks, signature, answer, and (for the
workload) loading the result into its TLS contexts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import anyio
import meshcore
from cryptography.hazmat.primitives.asymmetric import ec

import meshcore_tls
from meshcore_tls import CA, IdentityService, TokenStore
from meshcore_tls._ca import cert_pem, key_pem, write_private
from meshcore_tls._identity_client import make_csr


def setup(tmp: Path) -> Path:
    root = CA.create("example.org")
    root.save(tmp / "root")
    sub = root.issue_intermediate()
    d = tmp / "identity"
    d.mkdir(mode=0o700)
    assert sub.key is not None
    write_private(d / "intermediate.key", key_pem(sub.key))
    write_private(d / "intermediate.crt", cert_pem(sub.cert))
    write_private(d / "bundle.crt", cert_pem(root.cert))
    return d


def ms(samples: list[float]) -> str:
    samples = sorted(samples)
    return (
        f"median {statistics.median(samples) * 1e3:.2f} ms, "
        f"p90 {samples[int(len(samples) * 0.9)] * 1e3:.2f} ms"
    )


async def main(rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        d = setup(tmp)
        store = TokenStore(d / "tokens")
        async with IdentityService(d, port=0) as service:
            # The signing step alone (token check and use, CSR check, signature).
            key = ec.generate_private_key(ec.SECP256R1())
            body = json.dumps({"csr": make_csr(key, None)}).encode()
            tokens = [store.create("spiffe://example.org/ns/shop/sa/web")[1] for _ in range(rounds)]
            sign = []
            for token in tokens:
                t0 = time.perf_counter()
                service.sign(body, token, None)
                sign.append(time.perf_counter() - t0)
            print(f"service: check token + CSR and sign:    {ms(sign)}")

            # A workload's first certificate (mesh start in identity mode) ...
            first = []
            token_file = tmp / "token"
            for _ in range(max(20, rounds // 5)):
                token_file.write_text(store.create("spiffe://example.org/ns/shop/sa/web")[1])
                config = {
                    "tls": {
                        "identity_service": service.address,
                        "ca": str(tmp / "root" / "ca.crt"),
                        "join_token_file": str(token_file),
                        "service": "web",
                        "namespace": "shop",
                    }
                }
                t0 = time.perf_counter()
                async with meshcore.Mesh(config, ["tls"]) as mesh:
                    first.append(time.perf_counter() - t0)
                    workload = meshcore_tls.workload(mesh)
                    # ... and its renewals over mTLS.
                    renew = []
                    for _ in range(rounds):
                        t0 = time.perf_counter()
                        await workload.identity_source.fetch()
                        renew.append(time.perf_counter() - t0)
            print(f"workload: first certificate (join token): {ms(first)} (mesh start included)")
            print(f"workload: renewal over mTLS:             {ms(renew)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    args = parser.parse_args()
    anyio.run(main, args.rounds, backend=args.backend)
