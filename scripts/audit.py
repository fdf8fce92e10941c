"""`make audit`: pip-audit over the pinned requirements, failing when it could not audit a package.

pip-audit reports a package whose advisories it cannot fetch as skipped and still exits 0 with "No known
vulnerabilities found" (offline, every package is skipped), so its exit code alone would be a check that always
passes. This reads its JSON report and fails on a skipped package as well as on a vulnerability."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(requirements: list[str]) -> int:
    command = [sys.executable, "-m", "pip_audit", "--progress-spinner", "off", "-f", "json"]
    for path in requirements:
        command += ["-r", str(ROOT / path)]
    result = subprocess.run(command, capture_output=True, text=True)
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        print(result.stderr.strip()[-2000:], file=sys.stderr)
        print("error: pip-audit gave no report (is the network reachable?)", file=sys.stderr)
        return 2
    dependencies = report.get("dependencies", [])
    skipped = [dep for dep in dependencies if dep.get("skip_reason")]
    vulnerable = [dep for dep in dependencies if dep.get("vulns")]
    for dep in vulnerable:
        for vuln in dep["vulns"]:
            fixed = ", ".join(vuln.get("fix_versions") or []) or "no fixed version yet"
            print(f"{dep['name']} {dep['version']}: {vuln['id']} (fixed in {fixed})")
    print(f"{len(dependencies)} packages: {len(vulnerable)} with known vulnerabilities, {len(skipped)} not audited")
    if skipped:
        names = ", ".join(dep["name"] for dep in skipped[:10]) + (" …" if len(skipped) > 10 else "")
        print(
            f"error: {len(skipped)} packages could not be audited ({names}): pip-audit could not reach its "
            "advisory database; run `make audit` on a machine with internet access",
            file=sys.stderr,
        )
        return 2
    return 1 if vulnerable else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["requirements.txt"]))
