"""Install, offline, what this Python lacks of a wheelhouse built by tools/build_wheelhouse.sh.

    python tools/gpu_acceptance_install.py --wheelhouse DIR --site DIR [--scratch DIR]

tools/gpu_acceptance.sh runs it as its install step, whichever steps were asked for. Every
distribution of the wheelhouse that this Python cannot import (and DeepSpeed unless it is at
DEEPSPEED_VERSION) is installed with `pip install --target SITE --no-deps`: the machine's own
environment (read-only on some images) is never written and its torch, numpy and pytest stay as they
are; the caller puts SITE on PYTHONPATH. When nothing is missing and --scratch is given (the CPU dry
run), every wheel is installed into that scratch folder instead, so the wheels are still proved to
install offline for this Python. pip runs isolated: no PIP_* variable and no pip.conf reaches it (a
find-links or index from the environment would make "wheelhouse only" untrue).
"""
from __future__ import annotations

import argparse
import importlib.metadata as metadata
import os
import re
import subprocess
import sys
import time
import zipfile

DEEPSPEED_VERSION = "0.19.8"
"""The DeepSpeed the project is tested with (tools/build_wheelhouse.sh puts this one in the wheelhouse)."""

CHECK_IMPORTS = ("deepspeed", "pydantic", "hjson", "pytest", "pytest_timeout")
"""Imported after the install: what the GPU tests, the profile and the benchmarks need beyond torch."""

WHEEL_NAME = re.compile(r"^(?P<name>[A-Za-z0-9_.]+)-(?P<version>[0-9][^-]*)-(?P<rest>.+)\.whl$")


def python_tag() -> str:
    return "cp%d%d" % sys.version_info[:2]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheelhouse_distributions(wheelhouse: str) -> dict[str, str]:
    """Canonical distribution name -> version of every wheel in the folder."""
    found = {}
    for file in sorted(os.listdir(wheelhouse)):
        match = WHEEL_NAME.match(file)
        if match:
            found[canonical(match["name"])] = match["version"]
    return found


def check_compiled_wheels(wheelhouse: str) -> None:
    """Exit with the rebuild command when the wheelhouse has no pydantic-core wheel for this Python."""
    files = os.listdir(wheelhouse)
    tags = sorted({m.group(1) for f in files if (m := re.match(r"pydantic_core-[^-]+-(cp\d+)-", f))})
    if python_tag() not in tags:
        version = "%d.%d" % sys.version_info[:2]
        sys.exit(f"the wheelhouse {wheelhouse} has no pydantic-core wheel for this Python ({python_tag()}); "
                 f"it has: {' '.join(tags) or 'none'}. Rebuild it with: bash tools/build_wheelhouse.sh "
                 f"--python {version}")


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def wheel_requirements(wheelhouse: str) -> dict:
    """Canonical name -> the versions every wheel of the folder accepts (its METADATA's Requires-Dist)."""
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    accepted: dict[str, SpecifierSet] = {}
    for file in sorted(os.listdir(wheelhouse)):
        if not WHEEL_NAME.match(file):
            continue
        with zipfile.ZipFile(os.path.join(wheelhouse, file)) as wheel:
            metadata_name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
            lines = wheel.read(metadata_name).decode().splitlines()
        for line in lines:
            if line.startswith("Requires-Dist:"):
                requirement = Requirement(line.split(":", 1)[1].strip())
                if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                    name = canonical(requirement.name)
                    accepted[name] = accepted.get(name, SpecifierSet()) & requirement.specifier
    return accepted


def missing_distributions(available: dict[str, str], accepted: dict) -> list[str]:
    """Requirement strings for what this Python lacks, or has at a version another wheel refuses
    (e.g. pydantic needs typing-extensions>=4.16); DeepSpeed: unless at DEEPSPEED_VERSION."""
    wanted = []
    for name, version in available.items():
        have = installed_version(name)
        if name == "deepspeed":
            if have != DEEPSPEED_VERSION:
                wanted.append(f"deepspeed=={DEEPSPEED_VERSION}")
        elif have is None or (name in accepted and not accepted[name].contains(have, prereleases=True)):
            wanted.append(f"{name}=={version}")
    return wanted


def isolated_pip_env() -> tuple[dict[str, str], list[str]]:
    """This environment without PIP_* variables (their names returned) and with no pip.conf read."""
    removed = sorted(key for key in os.environ if key.startswith("PIP_"))
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env, removed


def pip_install(wheelhouse: str, target: str, requirements: list[str]) -> None:
    env, removed = isolated_pip_env()
    print(f"pip environment cleared: {', '.join(removed) or 'no PIP_* variables'} removed, no pip.conf read")
    command = [sys.executable, "-m", "pip", "--isolated", "install", "--no-index", "--find-links", wheelhouse,
               "--no-deps", "--no-compile", "--target", target, "--upgrade", *requirements]
    print("+", " ".join(command), flush=True)
    began = time.perf_counter()
    subprocess.run(command, env=env, check=True)
    print(f"installed {len(requirements)} distribution(s) into {target} in {time.perf_counter() - began:.1f} s")


def check_imports(site: str) -> None:
    """Import CHECK_IMPORTS in a fresh interpreter with `site` first on the path, as the later steps will."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")]))}
    code = ("import importlib, deepspeed; [importlib.import_module(m) for m in %r]; "
            "print('deepspeed', deepspeed.__version__, 'from', deepspeed.__file__)" % (CHECK_IMPORTS,))
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheelhouse", required=True, help="folder of wheels (tools/build_wheelhouse.sh)")
    parser.add_argument("--site", required=True, help="install target; the caller puts it on PYTHONPATH")
    parser.add_argument("--scratch", default=None,
                        help="when nothing is missing, install every wheel here instead (dry run)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.wheelhouse):
        sys.exit(f"--wheelhouse {args.wheelhouse}: no such folder; build it with bash tools/build_wheelhouse.sh")
    check_compiled_wheels(args.wheelhouse)
    available = wheelhouse_distributions(args.wheelhouse)
    if "deepspeed" not in available:
        sys.exit(f"the wheelhouse {args.wheelhouse} has no DeepSpeed wheel; rebuild it with tools/build_wheelhouse.sh")
    missing = missing_distributions(available, wheel_requirements(args.wheelhouse))
    print(f"python {sys.version.split()[0]} ({python_tag()}) at {sys.executable}; the wheelhouse has "
          f"{len(available)} distributions; missing here: {' '.join(missing) or 'none'}")
    if missing:
        pip_install(args.wheelhouse, args.site, missing)
        check_imports(args.site)
    elif args.scratch:
        print(f"nothing missing: installing every wheel into the scratch folder {args.scratch} (dry run)")
        everything = [f"{name}=={version}" for name, version in available.items()]
        pip_install(args.wheelhouse, args.scratch, everything)
    else:
        print("nothing to install")
    return 0


if __name__ == "__main__":
    sys.exit(main())
