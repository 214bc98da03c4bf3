"""A bounded schemathesis run of the token endpoint's OpenAPI document: no 5xx, answers as documented."""

from __future__ import annotations

import json
import re
import subprocess
from collections import Counter
import sys
import uuid
from pathlib import Path


from config.settings import build_settings
from orchestration.auth import dev_access_token
from tests.integration.test_token_endpoint import LEGACY_SECRET, auth, invite, start_web  # noqa: F401 - auth fixture

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"


def test_fuzz_token_endpoint_finds_no_server_errors(log_dir, auth, db, make_user, tmp_path):  # noqa: F811
    caller, callee = make_user("Fuzz Caller"), make_user()
    invite(db, caller, callee, room="call-3f2a9c")  # the schema's example room: one 200 path is covered too
    proc, base = start_web(log_dir, auth, CALLFLOW_TOKEN_RATE_PER_MINUTE="100000")
    try:
        # `callflow dev-token`'s token, signed with the web process's legacy secret.
        token = dev_access_token(build_settings(supabase_url=auth.url, supabase_jwt_secret=LEGACY_SECRET), caller)
        result = subprocess.run(
            [str(SCHEMATHESIS), "run", f"{base}/openapi.json",
             "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                         "response_schema_conformance,response_headers_conformance",
             # The token route alone (every /api/ route: test_api_fuzz); no stateful phase, whose
             # links lead to the routes left out.
             "--include-path", "/api/livekit/token", "--phases", "examples,coverage,fuzzing",
             # One worker: more run as threads that parse source at once (hypothesis describing its
             # lambdas), which CPython 3.11 can fail with "AST constructor recursion depth mismatch"
             # (gh-106905): a failure of the fuzzer, not of the endpoint.
             "--max-examples", "100", "--seed", str(uuid.uuid4().int % 100000), "--workers", "1",
             "--header", f"Authorization: Bearer {token}",
             "--generation-database", "none", "--no-color", "--request-timeout", "10",
             "--report", "har", "--report-har-path", str(tmp_path / "run.har")],
            capture_output=True, text=True, timeout=240, cwd=tmp_path,  # its caches stay out of the repo
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-6000:]
        generated = re.search(r"(\d+) generated", output)
        assert generated and int(generated.group(1)) >= 50, output[-3000:]
        entries = json.loads((tmp_path / "run.har").read_text())["log"]["entries"]
        statuses = Counter(e["response"]["status"] for e in entries)
        assert not any(status >= 500 for status in statuses), statuses
        # The token was accepted, so the fuzzing reached the body checks and the database.
        assert statuses[422] and (statuses[404] or statuses[403] or statuses[200]), statuses
        assert "Traceback" not in proc.log(), proc.log()[-4000:]
    finally:
        proc.stop()
