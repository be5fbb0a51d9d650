"""grpcio classes for the contract, generated with grpc_tools at bench time.

Quotopia itself uses betterproto2 and grpclib; the load client and the grpcio
peer use the plain protoc output, generated fresh from ``proto/quotes.proto`` into
a temporary directory so nothing generated is ever committed for the bench.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["PROTO_DIR", "generate", "load"]

PROTO_DIR = Path(__file__).resolve().parents[2] / "proto"


def generate(out_dir: Path) -> Path:
    """Write ``quotes_pb2.py`` and ``quotes_pb2_grpc.py`` into ``out_dir``; return it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            "quotes.proto",
        ],
        check=True,
    )
    return out_dir


def load(out_dir: Path) -> tuple[ModuleType, ModuleType]:
    """Import the generated ``(quotes_pb2, quotes_pb2_grpc)`` from ``out_dir``."""
    path = str(out_dir)
    if path not in sys.path:
        sys.path.insert(0, path)
    return importlib.import_module("quotes_pb2"), importlib.import_module("quotes_pb2_grpc")
