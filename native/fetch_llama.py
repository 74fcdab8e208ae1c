"""Prepare the patched llama.cpp sources that loramux's native library is built from.

The sources are the llama.cpp that llama-cpp-python vendors (``vendor/llama.cpp`` in its sdist,
llama-cpp-python 0.3.36 vendors llama.cpp 0c1e57098). The sdist is obtained through pip (no
download address lives in this repository), unpacked, overlaid with ``native/src``, ``native/server/src`` and
``native/include`` and patched with ``native/patches/*.patch``.

The result is synced into one stable folder: a file is rewritten only when its content changed,
so a rebuild after editing one file recompiles one file (and ccache's keys stay stable).

Standard library only: CMake runs this script (``native/CMakeLists.txt``) with the Python that
runs the build; ``scripts/build_native.sh`` runs it too. Prints the path of the source tree.

``--unpatched`` prepares the same vendored sources untouched instead (no overlay, no patch), for
stock llama.cpp tools built from the same pin (``scripts/build_llama_server.sh``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
VENDORED_COMMIT = "0c1e57098"
HERE = Path(__file__).resolve().parent
OVERLAYS = (("src", "src"), ("include", "include"), ("server/src", "tools/server"))  # (folder under native/, folder under llama.cpp/)
STAMP = ".loramux-sources"


class FetchError(RuntimeError):
    pass


def patch_files() -> list[Path]:
    return sorted((HERE / "patches").glob("*.patch"))


def overlay_files() -> list[tuple[Path, str]]:
    """(file, path relative to llama.cpp/) of every overlaid source."""
    out = []
    for sub, dest in OVERLAYS:
        for f in sorted((HERE / sub).rglob("*")):
            if f.is_file():
                out.append((f, f"{dest}/{f.relative_to(HERE / sub).as_posix()}"))
    return out


def sources_key(version: str) -> str:
    """Hash of everything the patched tree depends on."""
    h = hashlib.sha256(f"llama-cpp-python=={version};".encode())
    for f in patch_files():
        h.update(f"patch:{f.name}:".encode() + f.read_bytes())
    for f, rel in overlay_files():
        h.update(f"overlay:{rel}:".encode() + f.read_bytes())
    return h.hexdigest()


def find_sdist(folder: Path, version: str) -> Path | None:
    for name in (f"llama_cpp_python-{version}.tar.gz", f"llama-cpp-python-{version}.tar.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def download_sdist(folder: Path, version: str, python: str) -> Path:
    """The llama-cpp-python sdist, through pip (cached in ``folder``)."""
    found = find_sdist(folder, version)
    if found:
        return found
    folder.mkdir(parents=True, exist_ok=True)
    # --no-binary for this one package: the sdist; --no-build-isolation: pip reads its metadata
    # with the build backend already present instead of building a fresh build environment.
    cmd = [
        python,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        "llama-cpp-python",
        "--no-build-isolation",
        f"llama-cpp-python=={version}",
        "-d",
        str(folder),
    ]
    print(f"loramux: fetching the llama-cpp-python {version} sdist through pip", file=sys.stderr)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found = find_sdist(folder, version)
    if proc.returncode != 0 or not found:
        raise FetchError(
            f"pip could not download the llama-cpp-python {version} sdist (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
            "Download it yourself (pip download --no-deps --no-binary llama-cpp-python "
            f"llama-cpp-python=={version}) and pass its path with --sdist / LORAMUX_LLAMA_SDIST."
        )
    return found


def extract_vendor(sdist: Path, dest: Path) -> Path:
    """Unpack only vendor/llama.cpp of the sdist into dest; return the llama.cpp folder."""
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            parts = Path(m.name).parts
            if ".git" in parts:
                continue  # a submodule pointer of llama-cpp-python's repository, not a source
            if len(parts) >= 3 and parts[1] == "vendor" and parts[2] == "llama.cpp" and (m.isfile() or m.isdir()):
                if ".." in parts or Path(m.name).is_absolute():
                    raise FetchError(f"{sdist}: unsafe member {m.name}")
                members.append(m)
        if not members:
            raise FetchError(f"{sdist} holds no vendor/llama.cpp")
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, members=members, **kwargs)
    return dest / Path(members[0].name).parts[0] / "vendor" / "llama.cpp"


def apply_patch(tree: Path, patch: Path) -> None:
    attempts = []
    if shutil.which("git"):
        attempts.append(["git", "apply", "--whitespace=nowarn", str(patch)])
    if shutil.which("patch"):
        attempts.append(["patch", "-p1", "--forward", "--batch", "-i", str(patch)])
    if not attempts:
        raise FetchError("applying the loramux patch needs git or patch on PATH")
    # Inside another git work tree (a checkout's build/ folder), `git apply` would resolve paths
    # against that repository and silently skip every file: stop git's repository discovery here.
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(tree.resolve().parent))
    errors = []
    for cmd in attempts:
        proc = subprocess.run(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode == 0:
            return
        errors.append(f"{' '.join(cmd[:2])}: {proc.stdout.strip()[-2000:]}")
    raise FetchError(f"{patch.name} does not apply to the llama.cpp sources:\n" + "\n".join(errors))


def sync_tree(src: Path, dst: Path) -> int:
    """Make dst equal to src, rewriting only changed files (keeps mtimes of unchanged ones)."""
    changed = 0
    wanted = set()
    for f in src.rglob("*"):
        rel = f.relative_to(src)
        wanted.add(rel)
        target = dst / rel
        if f.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        data = f.read_bytes()
        if target.is_file() and target.read_bytes() == data:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        shutil.copymode(f, target)
        changed += 1
    for f in sorted(dst.rglob("*"), reverse=True):
        rel = f.relative_to(dst)
        if rel not in wanted and rel.name != STAMP:
            f.unlink() if not f.is_dir() else shutil.rmtree(f, ignore_errors=True)
    return changed


def prepare(dest: Path, *, version: str = LLAMA_CPP_PYTHON_VERSION, sdist: Path | None = None, python: str = sys.executable) -> Path:
    """Return dest/llama.cpp holding the patched sources (prepared once per sources key)."""
    tree = dest / "llama.cpp"
    key = sources_key(version)
    stamp = tree / STAMP
    if stamp.is_file() and stamp.read_text().strip() == key:
        return tree
    sdist = sdist or find_sdist(dest / "sdist", version) or download_sdist(dest / "sdist", version, python)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        fresh = extract_vendor(sdist, Path(tmp))
        for f, rel in overlay_files():
            (fresh / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, fresh / rel)
        for p in patch_files():
            apply_patch(fresh, p)
        for cmake_list, source in (("src", "llama-mux.cpp"), ("tools/server", "server-loramux.cpp")):
            if source not in (fresh / cmake_list / "CMakeLists.txt").read_text():
                raise FetchError(f"the loramux patches reported success but {fresh}/{cmake_list}/CMakeLists.txt lacks {source}")
        tree.mkdir(parents=True, exist_ok=True)
        n = sync_tree(fresh, tree)
    stamp.write_text(key + "\n")
    print(f"loramux: llama.cpp sources ready in {tree} ({n} files written)", file=sys.stderr)
    return tree


def prepare_unpatched(
    dest: Path,
    *,
    version: str = LLAMA_CPP_PYTHON_VERSION,
    sdist: Path | None = None,
    sdist_dir: Path | None = None,
    python: str = sys.executable,
) -> Path:
    """Return dest/llama.cpp holding the vendored sources exactly as the sdist ships them.

    No overlay and no patch: the tree stock llama.cpp tools (llama-server) are built from. The sdist
    is looked for (and downloaded through pip if missing) in ``sdist_dir`` (default dest/sdist), so
    it can share the download of :func:`prepare`. Extracted once per version (stamp file).
    """
    tree = dest / "llama.cpp"
    key = f"unpatched;llama-cpp-python=={version}"
    stamp = tree / STAMP
    if stamp.is_file() and stamp.read_text().strip() == key:
        return tree
    sdist_dir = sdist_dir or dest / "sdist"
    sdist = sdist or find_sdist(sdist_dir, version) or download_sdist(sdist_dir, version, python)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        fresh = extract_vendor(sdist, Path(tmp))
        if not (fresh / "tools" / "server" / "CMakeLists.txt").is_file():
            raise FetchError(f"{sdist}: vendor/llama.cpp has no tools/server")
        tree.mkdir(parents=True, exist_ok=True)
        n = sync_tree(fresh, tree)
    stamp.write_text(key + "\n")
    print(f"loramux: unpatched llama.cpp sources ready in {tree} ({n} files written)", file=sys.stderr)
    return tree


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", required=True, type=Path, help="cache folder (holds sdist/ and llama.cpp/)")
    ap.add_argument(
        "--sdist",
        type=Path,
        default=os.environ.get("LORAMUX_LLAMA_SDIST") or None,
        help="a llama-cpp-python sdist already on disk (default: fetched through pip)",
    )
    ap.add_argument("--version", default=LLAMA_CPP_PYTHON_VERSION)
    ap.add_argument(
        "--unpatched", action="store_true", help="the vendored sources as shipped (no overlay, no patch), for stock llama.cpp tools"
    )
    ap.add_argument("--sdist-dir", type=Path, default=None, help="with --unpatched: where the sdist is cached (default: DEST/sdist)")
    ap.add_argument(
        "--sdist-only",
        action="store_true",
        help="only fetch the sdist into DEST/sdist and print its path (scripts/setup.sh installs llama-cpp-python from it)",
    )
    args = ap.parse_args(argv)
    args.dest.mkdir(parents=True, exist_ok=True)
    try:
        if args.sdist_only:
            folder = args.dest.resolve() / "sdist"
            print(args.sdist or find_sdist(folder, args.version) or download_sdist(folder, args.version, sys.executable))
        elif args.unpatched:
            print(
                prepare_unpatched(
                    args.dest.resolve(),
                    version=args.version,
                    sdist=args.sdist,
                    sdist_dir=args.sdist_dir.resolve() if args.sdist_dir else None,
                )
            )
        else:
            print(prepare(args.dest.resolve(), version=args.version, sdist=args.sdist))
    except (FetchError, OSError, tarfile.TarError) as exc:
        print(f"loramux: cannot prepare the llama.cpp sources: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
