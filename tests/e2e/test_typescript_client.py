"""The TypeScript client's follow() against a real server (Node, HTTP/2 gRPC)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import RunningServer

TS_DIR = Path(__file__).resolve().parents[2] / "clients" / "typescript"


async def run(*argv: str, cwd: Path) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_typescript_follow_reads_a_stream(server: RunningServer, tmp_path: Path) -> None:
    tsc = TS_DIR / "node_modules" / ".bin" / "tsc"
    node = shutil.which("node")
    if not tsc.exists() or node is None:
        pytest.skip("Node.js dependencies are not installed (make ts-check installs them)")
    out_dir = tmp_path / "dist"
    code, out, err = await run(
        str(tsc), "-p", "tsconfig.smoke.json", "--outDir", str(out_dir), cwd=TS_DIR
    )
    assert code == 0, out + err
    # Compiled modules import their dependencies from the package's node_modules.
    (out_dir / "node_modules").symlink_to(TS_DIR / "node_modules")
    (out_dir / "package.json").write_text('{"type": "module"}')
    code, out, err = await run(
        node, str(out_dir / "test" / "follow.smoke.js"), server.target, cwd=out_dir
    )
    assert code == 0, out + err
    assert json.loads(out) == {"text": "typescript follows the stream", "ended": True}
