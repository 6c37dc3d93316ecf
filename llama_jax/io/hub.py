"""Models by their Hugging Face Hub name: `hf://org/name[/subfolder][@revision]` wherever a path is taken.

`resolve(path)` turns such a name into a local directory through `huggingface_hub.snapshot_download`, with
the library's own cache (HF_HOME / HF_HUB_CACHE), progress bars (HF_HUB_DISABLE_PROGRESS_BARS), token (HF_TOKEN
or `hf auth login`) and offline mode (HF_HUB_OFFLINE=1: the cached snapshot, no network). Only the files
llama_jax reads are downloaded: config.json, the safetensors weights and their index, the tokenizer and
generation files, and a Meta directory's params.json + consolidated.NN.pth (e.g.
`hf://meta-llama/Llama-3.2-1B/original`). Any other path is returned unchanged.

`push_folder` is the other way: a directory (the converter's `--to-hf` output) uploaded as one commit.
"""

from __future__ import annotations

import os
import re
from typing import Callable, List, Optional, Tuple

from llama_jax.errors import HubError

PREFIX = "hf://"
WEIGHT_PATTERNS = ("*.safetensors", "model.safetensors.index.json", "config.json", "params.json",
                   "consolidated.*.pth")
TOKENIZER_PATTERNS = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
                      "preprocessor_config.json", "processor_config.json")  # Llama 3.2 Vision's image settings
LOGIN = "log in with `hf auth login` (or set HF_TOKEN to a token from https://huggingface.co/settings/tokens)"
_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub(path) -> bool:
    return isinstance(path, str) and path.startswith(PREFIX)


def parse(url: str) -> Tuple[str, Optional[str], str]:
    """'hf://org/name/sub@rev' -> ('org/name', 'rev', 'sub'); revision None means the main branch."""
    rest, _, revision = url[len(PREFIX):].partition("@")
    parts = rest.strip("/").split("/")
    repo_id, subfolder = "/".join(parts[:2]), "/".join(parts[2:])
    if not _NAME.fullmatch(repo_id) or (revision == "" and "@" in url):
        raise HubError(f"{url}: not a Hub model name; expected hf://ORG/NAME[/SUBFOLDER][@REVISION], "
                       "e.g. hf://meta-llama/Llama-3.2-1B")
    return repo_id, revision or None, subfolder


def check_repo_id(repo_id: str) -> str:
    if not _NAME.fullmatch(repo_id or ""):
        raise HubError(f"--push-to-hub {repo_id!r}: expected a repository name ORG/NAME (or USER/NAME)")
    return repo_id


def allow_patterns(subfolder: str = "") -> List[str]:
    prefix = f"{subfolder}/" if subfolder else ""
    return [prefix + p for p in WEIGHT_PATTERNS + TOKENIZER_PATTERNS]


def resolve(path) -> str:
    """A local directory for `path`: an hf:// name is fetched into (or found in) the Hugging Face cache."""
    if not is_hub(path):
        return os.fspath(path)
    repo_id, revision, subfolder = parse(path)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise HubError(f"{path}: hf:// names need huggingface_hub: pip install huggingface_hub") from None
    try:
        local = snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns(subfolder))
    except Exception as e:  # noqa: BLE001 - the library's errors, each turned into one line below
        raise HubError(describe(e, path, repo_id)) from None
    local = os.path.join(local, subfolder) if subfolder else local
    if not os.path.isdir(local):
        raise HubError(f"{path}: the repository has no folder {subfolder!r}")
    return local


def describe(error: Exception, url: str, repo_id: str) -> str:
    """One line for a huggingface_hub error: what went wrong with `url` and what to do."""
    from huggingface_hub import errors

    page = f"https://huggingface.co/{repo_id}"
    if isinstance(error, errors.GatedRepoError):
        return f"{url}: a gated model; request access on {page}, then {LOGIN}"
    if isinstance(error, errors.RepositoryNotFoundError):
        return f"{url}: no such model on the Hub, or a private one; check the name at {page}, or {LOGIN}"
    if isinstance(error, errors.RevisionNotFoundError):
        return f"{url}: the model has no revision {parse(url)[1]!r} (a branch, tag or commit of {page})"
    if isinstance(error, errors.LocalEntryNotFoundError):
        from huggingface_hub import constants

        return (f"{url}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the Hub cannot be reached "
                "(offline: HF_HUB_OFFLINE=1, or no network); fetch it once online")
    if isinstance(error, errors.HfHubHTTPError) and getattr(error.response, "status_code", None) == 401:
        return f"{url}: the Hub refused the token; {LOGIN}"
    return f"{url}: cannot fetch from the Hugging Face Hub: {' '.join(str(error).split())[:300]}"


def push_folder(folder: str, repo_id: str, *, dry_run: bool = False, private: bool = False,
                message: Optional[str] = None, log: Callable[[str], None] = print) -> list:
    """Upload every file under `folder` to the model repository `repo_id` as one commit (created if missing).
    Returns the CommitOperationAdd list; with `dry_run` it only logs what would be pushed."""
    try:
        from huggingface_hub import CommitOperationAdd, HfApi
    except ImportError:
        raise HubError("--push-to-hub needs huggingface_hub: pip install huggingface_hub") from None
    check_repo_id(repo_id)
    operations = []
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            local = os.path.join(root, name)
            operations.append(CommitOperationAdd(path_in_repo=os.path.relpath(local, folder).replace(os.sep, "/"),
                                                 path_or_fileobj=local))
    total = sum(os.path.getsize(op.path_or_fileobj) for op in operations)
    url = f"https://huggingface.co/{repo_id}"
    if dry_run:
        for op in operations:
            log(f"  {op.path_in_repo}  {format_bytes(os.path.getsize(op.path_or_fileobj))}")
        log(f"dry run: would push {len(operations)} files ({format_bytes(total)}) to {url}")
        return operations
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.create_commit(repo_id, operations, commit_message=message or "Upload a llama_jax export")
    except Exception as e:  # noqa: BLE001 - the library's errors, as one line
        raise HubError(describe(e, f"{PREFIX}{repo_id}", repo_id)) from None
    log(f"pushed {len(operations)} files ({format_bytes(total)}) to {url}")
    return operations


def format_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"
