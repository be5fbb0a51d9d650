"""The committed generated code matches proto/, and the contract keeps its shape."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from quotopia import _proto

ROOT = Path(__file__).resolve().parent.parent


def _gen_proto() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_code_is_fresh() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_check_detects_stale_code(tmp_path: Path) -> None:
    gen = _gen_proto()
    fresh = tmp_path / "fresh"
    gen.generate(fresh)
    committed = tmp_path / "committed"
    shutil.copytree(fresh, committed)
    assert gen.stale_files(committed, fresh) == []

    init = committed / "__init__.py"
    init.write_text(init.read_text().replace("sequence", "seq"))
    (committed / "extra.py").write_text("")
    assert gen.stale_files(committed, fresh) == ["__init__.py", "extra.py"]


def test_contract_field_numbers_and_method_path() -> None:
    fields = {f.name: f.number for f in _proto.Quote.DESCRIPTOR.fields}
    assert fields == {
        "symbol": 1,
        "price": 2,
        "time": 3,
        "change_percent": 4,
        "sequence": 5,
        "run_id": 6,
    }
    request = {f.name: f.number for f in _proto.StreamQuotesRequest.DESCRIPTOR.fields}
    assert request == {"symbols": 1}
    file = _proto.Quote.DESCRIPTOR.file
    assert file.package == ""
    method = file.services_by_name["QuoteService"].methods_by_name["StreamQuotes"]
    assert method.server_streaming
    assert not method.client_streaming
    assert _proto.QuoteServiceBase().__mapping__().keys() == {"/QuoteService/StreamQuotes"}


def test_field_types() -> None:
    from google.protobuf.descriptor import FieldDescriptor

    by_name = _proto.Quote.DESCRIPTOR.fields_by_name
    assert by_name["symbol"].type == FieldDescriptor.TYPE_STRING
    assert by_name["price"].type == FieldDescriptor.TYPE_DOUBLE
    timestamp = by_name["time"].message_type
    assert timestamp is not None
    assert timestamp.full_name == "google.protobuf.Timestamp"
    assert by_name["change_percent"].type == FieldDescriptor.TYPE_DOUBLE
    assert by_name["sequence"].type == FieldDescriptor.TYPE_UINT64
