"""The push stage: publish the adapter, the merged model and its GGUF files to the Hugging Face Hub, with a model card.

A push is a few commits made through huggingface_hub, which retries and sends large files through LFS/Xet:
    1. the adapter (or the merged model, when only that is pushed) and `medcot.json`, the mark that medcot
       owns the repo;
    2. the merged model, when both are pushed (the adapter then lives under `adapter/`);
    3. the export job's GGUF files, Modelfile and Ollama's `template` and `params`, at the repo root, where the Hub
       and `ollama run hf.co/<repo>:Q8_0` look for them, when the export stage is published;
    4. README.md, the model card, last: a repo with a card is a complete push.
Files already on the Hub with the same content are skipped, so a rerun after a failure finishes what is
missing. A dry run writes the same plan and card to a folder and opens no socket.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx  # huggingface_hub's HTTP client: its network errors and the Hub's derive from httpx.HTTPError
from huggingface_hub import CommitOperationAdd, HfApi, ModelCardData
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from huggingface_hub.hf_api import RepoFile

from medcot.config import RunConfig
from medcot.metrics import compare, format_table
from medcot.prompts import INFERENCE_TEMPLATE
from medcot.rundir import DRY_RUN_DIR, Manifest, RunDir, StageError, versions
from medcot.secrets import redact

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
OWNER_FILE = "medcot.json"  # its presence marks a repo that medcot made (see `_check_repo`)
PLAN_FILE = "push-plan.json"
RESULT_FILE = "push-result.json"
CARD_MARKER = "<!-- medcot:model-card -->"
TOKENS_URL = "https://huggingface.co/settings/tokens"
# Files of a stage folder that are not part of the model: our own card replaces peft's template README.
_NOT_UPLOADED = {CARD_FILE, "manifest.json"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WRITE_ROLES = ("write", "admin")


class PushError(ValueError):
    """A push that cannot go ahead: bad token, wrong namespace, foreign repo, or a Hub failure to retry."""


# ---- preflight: can this token write there? -------------------------------------------------------------


def placeholder_repo_id(config: RunConfig) -> str:
    return f"<your-username>/{config.run_name}"


def require_repo_id(config: RunConfig) -> str:
    """`push.repo_id`, checked for shape without any network; a PushError that says how to set it if unset."""
    if config.push.repo_id is None:
        raise PushError("push.repo_id is not set; set it in the config (push: repo_id: your-name/model-name) or "
                        "pass push.repo_id=your-name/model-name (--dry-run shows what would be uploaded without it)")
    _namespace(config.push.repo_id)
    return config.push.repo_id


def _namespace(repo_id: str) -> str:
    if not _HUB_ID.match(repo_id):
        raise PushError(f"push.repo_id {repo_id!r} is not 'namespace/name'; set it to your username or organisation "
                        f"and a model name, e.g. push.repo_id=your-name/medical-r1-lora")
    return repo_id.split("/")[0]


def preflight(repo_id: str, token: str | None, endpoint: str | None = None) -> str:
    """Check, before anything is hashed or uploaded, that `token` is valid and may create and write `repo_id`;
    returns the username.

    `endpoint` defaults to huggingface_hub's (the HF_ENDPOINT environment variable, else huggingface.co).
    """
    namespace = _namespace(repo_id)
    if not token:
        raise PushError(f"no Hugging Face token: set HF_TOKEN (in the environment, .env or /run/secrets/hf_token) "
                        f"to a token with write access from {TOKENS_URL}")
    if hf_constants.is_offline_mode():
        raise PushError("HF_HUB_OFFLINE is set, so huggingface_hub refuses every request; unset it for the push "
                        "job (HF_HUB_OFFLINE=0 make push)")
    api = HfApi(endpoint=endpoint, token=token)
    with _hub_errors(f"checking the HF token at {api.endpoint}", "retry in a minute"):
        try:
            who = api.whoami(token=token)
        except HfHubHTTPError as e:
            if e.response is not None and e.response.status_code == 401:
                raise PushError(f"the HF token was rejected by {api.endpoint} (401: invalid or revoked); create a "
                                f"write token at {TOKENS_URL} and set HF_TOKEN to it") from None
            raise
        problem = _write_problem(who, repo_id, namespace, api)
    if problem:
        raise PushError(problem)
    log.info("push: token of %s can write to %s on %s", who.get("name"), repo_id, api.endpoint)
    return who["name"]


def _write_problem(who: dict[str, Any], repo_id: str, namespace: str, api: HfApi) -> str | None:
    """Why the token behind `who` (a whoami-v2 answer) cannot create and write `repo_id`, or None."""
    user = who.get("name", "?")
    access = (who.get("auth") or {}).get("accessToken") or {}
    role = access.get("role")
    token_name = f"HF token '{access['displayName']}'" if access.get("displayName") else "HF token"
    if role == "read":
        return (f"the {token_name} of {user} is read-only and cannot create or write {repo_id}; create a token "
                f"with the 'write' role (or a fine-grained one with write access to '{namespace}') at {TOKENS_URL}")
    if role == "fineGrained":
        grants = access.get("fineGrained") or {}
        if "repo.write" in grants.get("global", []):
            return None
        writable = [s.get("entity", {}) for s in grants.get("scoped", []) if "repo.write" in s.get("permissions", [])]
        if any(e.get("type") in ("user", "org") and e.get("name") == namespace for e in writable):
            return None
        if any(e.get("type") == "model" and e.get("name") == repo_id for e in writable):
            if api.repo_exists(repo_id):
                return None
            return (f"the fine-grained {token_name} may write to {repo_id} but not create repos in '{namespace}', and "
                    f"{repo_id} does not exist; create it on the Hub first, or give the token write access to "
                    f"the repos of '{namespace}' at {TOKENS_URL}")
        can = ", ".join(sorted({str(e.get("name")) for e in writable})) or "nothing"
        return (f"the fine-grained {token_name} has no write access to '{namespace}' (it can write to: {can}); edit "
                f"the token at {TOKENS_URL} to add 'Write access to contents/settings of all repos' under "
                f"'{namespace}', or set push.repo_id to a namespace it can write")
    if role not in _WRITE_ROLES:
        return (f"cannot tell whether the {token_name} can write (its role is {role!r}); use an access token "
                f"with the 'write' role from {TOKENS_URL}")
    orgs = {o.get("name"): o.get("roleInOrg") for o in who.get("orgs", [])}
    if namespace != user and namespace not in orgs:
        return (f"push.repo_id {repo_id!r}: '{namespace}' is neither your username ({user}) nor one of your "
                f"organisations ({', '.join(sorted(orgs)) or 'none'}); use {user}/{repo_id.split('/')[1]} or "
                f"an organisation you belong to")
    if orgs.get(namespace) == "read":
        return (f"you ({user}) have the read role in the organisation '{namespace}' and cannot create repos "
                f"there; ask one of its admins for the write role, or push to {user}/{repo_id.split('/')[1]}")
    return None


# ---- the model card -------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _stage_json(run: RunDir, stage: str, name: str) -> dict[str, Any]:
    return _read_json(run.stage(stage) / name) if run.is_complete(stage) else {}


def _hub_id(name: str | None) -> str | None:
    """`name` when it reads as a Hub repo id (not a local path or an `embedded:` model), for card metadata."""
    if name and _HUB_ID.match(name) and not Path(name).exists():
        return name
    return None


def _params_table(section: dict[str, Any]) -> str:
    rows = ["| Key | Value |", "| --- | --- |"]
    rows += [f"| `{k}` | `{json.dumps(v)}` |" for k, v in section.items()]
    return "\n".join(rows)


def build_model_card(config: RunConfig, run_dir: Path | str, repo_id: str | None = None) -> str:
    """The Hub model card (README.md) for this run: metadata, data, recipe, before/after table, use, limits."""
    run = RunDir(run_dir)
    repo_id = repo_id or config.push.repo_id or placeholder_repo_id(config)
    what = config.push.what
    both = "adapter" in what and "merged" in what
    gguf = _gguf_export(config, run)
    train = _stage_json(run, "train", "summary.json")
    before = _stage_json(run, "eval-before", "summary.json")
    after = _stage_json(run, "eval-after", "summary.json")
    base = config.model.name
    dataset = config.data.path

    metadata = ModelCardData(
        base_model=_hub_id(base),
        datasets=[dataset] if _hub_id(dataset) else None,
        library_name="transformers" if "merged" in what else "peft",
        tags=["medcot", "medical", "reasoning", "chain-of-thought", "lora"] + (["peft"] if "adapter" in what else [])
        + (["gguf"] if gguf else []),
        language="en",
        pipeline_tag="text-generation",
    )
    data_report = train.get("data") or {}
    n_train = data_report.get("train_rows") or config.data.train_rows
    if data_report:
        rows = (f"{data_report.get('train_rows')} rows for training and {data_report.get('heldout_rows')} held out "
                f"for evaluation (of {data_report.get('rows_read')} read; {data_report.get('dropped_total', 0)} "
                f"dropped as invalid or longer than {config.model.max_seq_length} tokens)")
    else:
        rows = (f"the first {config.data.train_rows or 'all'} rows for training and the next "
                f"{config.data.heldout_rows} held out for evaluation")
    source = f"[{dataset}](https://huggingface.co/datasets/{dataset})" if _hub_id(dataset) else f"`{dataset}`"
    subset = f", config `{config.data.name}`" if config.data.name and _hub_id(dataset) else ""

    if both:
        contents = ("the LoRA weights merged into the base model in "
                    f"{config.merge.dtype} at the repo root, and the LoRA adapter alone under `adapter/`")
    elif "merged" in what:
        contents = f"the LoRA weights merged into the base model, in {config.merge.dtype}"
    elif "adapter" in what:
        contents = "the LoRA adapter; load it on top of the base model"
    else:
        contents = "the LoRA weights merged into the base model, as GGUF files"
    if gguf and contents != "the LoRA weights merged into the base model, as GGUF files":
        contents += ", and the merged model as GGUF files for llama.cpp, Ollama and LM Studio"

    if before and after:
        decoding = f"sampling at temperature {config.eval.temperature}" if config.eval.do_sample else "greedy decoding"
        evaluation = (f"Measured by medcot's evaluate job on the same held-out questions before and after "
                      f"fine-tuning ({decoding}, at most {config.eval.max_new_tokens} new tokens):\n\n"
                      f"{format_table(compare(before, after))}")
    else:
        evaluation = "This run published no before/after evaluation."
    trained = ""
    if train.get("global_step") is not None:
        loss = train.get("train_loss")
        trained = (f"\n\nTrained for {train['global_step']} optimizer steps"
                   + (f"; final training loss {loss:.4f}" if isinstance(loss, (int, float)) else "") + ".")

    card = f"""---
{metadata.to_yaml()}
---
{CARD_MARKER}

# {repo_id.split('/')[-1]}

A fine-tune of `{base}` that answers medical questions with a chain of thought inside `<think>…</think>`
followed by a final answer, fine-tuned with LoRA by medcot. This repo holds {contents}.

> **Not medical advice.** This model is a research artefact. Its answers can be wrong, incomplete or
> outdated while sounding confident. Do not use it to diagnose, treat or make any decision about a real
> patient; consult a qualified clinician.

## Training data

{source}{subset}, split `{config.data.split}`: {rows}. Columns: question `{config.data.columns.question}`,
chain of thought `{config.data.columns.cot}`, answer `{config.data.columns.response}`.

## Recipe

Base model `{base}`, maximum sequence length {config.model.max_seq_length} tokens,
{"4-bit NF4 base weights (QLoRA)" if config.model.load_in_4bit else "16-bit base weights"}.{trained}

LoRA:

{_params_table(config.lora.model_dump(mode="json"))}

Training:

{_params_table(config.training.model_dump(mode="json"))}

## Evaluation

{evaluation}

## Prompt template

{_prompt_section(config.data.template, repo_id)}

{_usage_section(repo_id, base, what, config.eval.max_new_tokens, config.data.template)}{_gguf_section(gguf, repo_id, config)}
## Intended use

Research on fine-tuning reasoning models for medical question answering: comparing recipes, studying how
chain-of-thought supervision changes answers, and teaching. It is not intended for clinical use, patient
communication, or any decision about health.

## Limitations

- Trained on {n_train or "all the"} question/reasoning/answer rows of one dataset; it inherits that dataset's
  errors, gaps and biases, and its reasoning style.
- The evaluation above compares the model with itself on held-out rows of the same dataset; it says little
  about clinical accuracy, safety, or behaviour on other questions.
- English only. Not tested on real patient data, rare conditions, dosing, or questions outside medicine.
- Long chains of thought can loop or stop before the final answer within the token budget.
- The license of the base model `{base}` applies to these weights.
"""
    return redact(card)


def _prompt_section(template: str, repo_id: str) -> str:
    """How to prompt the model as it was trained, and so how to serve it."""
    if template == "chat":
        return (f"Trained on its tokenizer's own chat template (medcot's `data.template: chat`): the question is the "
                "user's message, and the prompt is what `tokenizer.apply_chat_template(messages, "
                "add_generation_prompt=True)` renders, which is what a chat endpoint sends. Serve it with any of them "
                f"(`vllm serve {repo_id}`, TGI, or Ollama after a GGUF conversion) and send the question as the "
                "user's message. Each answer ends with the token that closes the template's assistant turn, which "
                "`generation_config.json` and the tokenizer name as the end of sequence.")
    return ("Training and evaluation use this template; generation continues after `<think>`:\n\n"
            f"```text\n{INFERENCE_TEMPLATE.format('{question}', '')}\n```\n\n"
            "The model learned this prompt, not its tokenizer's chat template: serve it through a completions "
            "endpoint (vLLM's `/v1/completions`, TGI's `/generate`) with this text. A chat endpoint would wrap the "
            "question in the chat template, a prompt the model was never trained on.")


def _usage_section(repo_id: str, base: str, what: list[str], max_new_tokens: int, template: str) -> str:
    if "merged" not in what and "adapter" not in what:
        return ""
    return f"## Usage\n\n```python\n{_usage_snippet(repo_id, base, what, max_new_tokens, template)}\n```\n"


def _gguf_export(config: RunConfig, run: RunDir) -> dict[str, Any] | None:
    """The export stage's manifest extra (its GGUF files, with type and size) when push.what includes gguf and the
    export stage is published, else None."""
    if "gguf" not in config.push.what:
        return None
    manifest = run.manifest("export")
    return manifest.extra if manifest is not None else None


def _gguf_section(export: dict[str, Any] | None, repo_id: str, config: RunConfig) -> str:
    """How to run the GGUF files: Ollama from the Hub or with the Modelfile, llama.cpp, LM Studio."""
    if not export:
        return ""
    files = export["files"]
    rows = "\n".join(f"| `{f['file']}` | {f['type'].upper()} | {f['bytes'] / 1e9:.2f} GB |" for f in files)
    first = files[0]
    tag = first["type"].upper()
    stops = ", ".join(f"`{s}`" for s in export["stop"])
    prompt = ("the recipe's prompt above, which the files' chat template renders" if config.data.template == "recipe"
              else "the tokenizer's chat template, which the files carry")
    return f"""
## GGUF: llama.cpp, Ollama, LM Studio

Written by medcot's export job from the merged weights:

| File | Type | Size |
| --- | --- | --- |
{rows}

Every file prompts the model with {prompt}, and generation stops at {stops}, where training ended its answers.

```bash
# Ollama, from the Hub: it reads this repo's `template` and `params` (a private repo needs your Ollama SSH key in
# your Hub account's settings)
ollama run hf.co/{repo_id}:{tag}
# Ollama, from the downloaded files
ollama create {config.run_name} -f Modelfile && ollama run {config.run_name}
# llama.cpp: one question, or an OpenAI-compatible server whose chat endpoint applies the file's template
llama-cli -m {first['file']} -st -p "A 45-year-old presents with crushing chest pain. Next step?"
llama-server -m {first['file']}
```

LM Studio loads the same files and applies their chat template.
"""


def _usage_snippet(repo_id: str, base: str, what: list[str], max_new_tokens: int, template: str) -> str:
    if "merged" in what:
        load = (f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")\n'
                f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", torch_dtype="auto", device_map="auto")')
        imports = "from transformers import AutoModelForCausalLM, AutoTokenizer"
    else:
        load = (f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")\n'
                f'base = AutoModelForCausalLM.from_pretrained("{base}", torch_dtype="auto", device_map="auto")\n'
                f'model = PeftModel.from_pretrained(base, "{repo_id}")')
        imports = "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer"
    question = "A 45-year-old presents with crushing chest pain radiating to the left arm. Next step?"
    if template == "chat":
        prompt = (f'messages = [{{"role": "user", "content": "{question}"}}]\n'
                  'inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",\n'
                  '                                       return_dict=True).to(model.device)')
    else:
        prompt = (f'TEMPLATE = """{INFERENCE_TEMPLATE.format("{}", "")}"""\n'
                  f'prompt = TEMPLATE.format("{question}")\n'
                  'inputs = tokenizer(prompt, return_tensors="pt").to(model.device)')
    return f'''{imports}

{load}

{prompt}
output = model.generate(**inputs, max_new_tokens={max_new_tokens}, do_sample=False)
print(tokenizer.decode(output[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))'''


# ---- the plan: which files go in which commit ----------------------------------------------------------


@dataclass
class PlannedFile:
    path_in_repo: str
    source: str  # path relative to the run directory, or "generated"
    size: int
    sha256: str
    local: Path | None = None
    content: bytes | None = None

    @classmethod
    def from_bytes(cls, path_in_repo: str, content: bytes) -> PlannedFile:
        return cls(path_in_repo, "generated", len(content), hashlib.sha256(content).hexdigest(), content=content)

    @classmethod
    def from_path(cls, path_in_repo: str, local: Path, run_root: Path) -> PlannedFile:
        h = hashlib.sha256()
        with local.open("rb") as f:
            for chunk in iter(lambda: f.read(8 << 20), b""):
                h.update(chunk)
        return cls(path_in_repo, str(local.relative_to(run_root)), local.stat().st_size, h.hexdigest(), local=local)

    def git_oid(self) -> str:
        """git's blob sha1, which the Hub reports for regular (non-LFS) files."""
        h = hashlib.sha1(b"blob %d\0" % self.size)
        if self.content is not None:
            h.update(self.content)
        else:
            with self.local.open("rb") as f:
                for chunk in iter(lambda: f.read(8 << 20), b""):
                    h.update(chunk)
        return h.hexdigest()


@dataclass
class PlannedCommit:
    name: str
    message: str
    files: list[PlannedFile] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def _folder_files(folder: Path, prefix: str, run_root: Path) -> list[PlannedFile]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in _NOT_UPLOADED
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise PushError(f"{folder} holds no files to upload; rerun the stage that writes it (--force)")
    return _hashed(folder, files, prefix, run_root)


def _hashed(folder: Path, files: list[Path], prefix: str, run_root: Path) -> list[PlannedFile]:
    # hashlib releases the GIL on large updates: the shards of a merged model hash side by side, one core each.
    with ThreadPoolExecutor(max_workers=min(len(files), os.cpu_count() or 1, 8)) as pool:
        return list(pool.map(lambda p: PlannedFile.from_path(prefix + p.relative_to(folder).as_posix(), p, run_root), files))


def _sources(config: RunConfig, run: RunDir) -> tuple[dict[str, Path], dict[str, str]]:
    """The folders to upload (adapter, merged) and the identities of the stages they and the card come from.
    Raises StageError naming the job to run when a needed stage is missing."""
    folders: dict[str, Path] = {}
    used: dict[str, Manifest] = {}
    if "merged" in config.push.what:
        used["merge"] = run.require("merge", "the push job (push.what includes 'merged')")
        folders["merged"] = run.stage("merge") / "model"
    if "adapter" in config.push.what:
        if run.is_complete("merge") and (run.stage("merge") / "adapter").is_dir():
            used["merge"] = run.require("merge", "the push job")
            folders["adapter"] = run.stage("merge") / "adapter"
        else:
            used["train"] = run.require("train", "the push job (push.what includes 'adapter')")
            folders["adapter"] = run.stage("train") / "adapter"
    if "gguf" in config.push.what:
        if run.is_complete("export"):
            used["export"] = run.require("export", "the push job")
            merge = run.manifest("merge")
            if merge is None or used["export"].inputs.get("merge") != merge.identity():
                raise StageError(f"the GGUF files in {run.stage('export')} were not written from the merged model in "
                                 f"{run.stage('merge')}; rerun the export job (make export ARGS=--force)")
            folders["gguf"] = run.stage("export")
        elif not folders:
            run.require("export", "the push job (push.what is [gguf])")
        else:
            log.info("push: no export stage in %s, so no GGUF files are pushed (make export writes them)", run.root)
    for stage in ("train", "eval-before", "eval-after"):  # they feed the model card
        manifest = run.manifest(stage)
        if manifest is not None:
            used[stage] = manifest
    return folders, {name: m.identity() for name, m in sorted(used.items())}


def _owner_record(config: RunConfig, inputs: dict[str, str]) -> bytes:
    # No timestamps: a rerun of the same run produces the same bytes, so the file is skipped, not recommitted.
    record = {
        "made_by": "medcot",
        "medcot_version": versions().get("medcot"),
        "run_name": config.run_name,
        "base_model": config.model.name,
        "dataset": config.data.path,
        "what": list(config.push.what),
        "layout": {"merged": "." if "merged" in config.push.what else None,
                   "adapter": ("adapter/" if "merged" in config.push.what else ".") if "adapter" in config.push.what else None,
                   "gguf": "." if "export" in inputs else None},
        "stages": inputs,
    }
    return redact(json.dumps(record, indent=2, sort_keys=True) + "\n").encode()


def _plan_commits(config: RunConfig, run: RunDir, repo_id: str, folders: dict[str, Path],
                  inputs: dict[str, str]) -> list[PlannedCommit]:
    """The commits of a push, in order, with every file's size and sha256 (this reads every byte once)."""
    what = config.push.what
    commits: list[PlannedCommit] = []
    if "adapter" in folders:
        prefix = "adapter/" if "merged" in what else ""
        commits.append(PlannedCommit("adapter", "Upload LoRA adapter (medcot)", _folder_files(folders["adapter"], prefix, run.root)))
    if "merged" in folders:
        commits.append(PlannedCommit("merged", f"Upload merged {config.merge.dtype} model (medcot)",
                                     _folder_files(folders["merged"], "", run.root)))
    if "gguf" in folders:
        export = run.manifest("export").extra
        names = [f["file"] for f in export["files"]] + export["ollama_files"]
        files = _hashed(folders["gguf"], [folders["gguf"] / name for name in names], "", run.root)
        commits.append(PlannedCommit("gguf", "Upload GGUF files and Ollama Modelfile (medcot)", files))
    commits[0].files.insert(0, PlannedFile.from_bytes(OWNER_FILE, _owner_record(config, inputs)))
    card = build_model_card(config, run.root, repo_id)
    commits.append(PlannedCommit("card", "Add model card (medcot)", [PlannedFile.from_bytes(CARD_FILE, card.encode())]))
    return commits


def _plan_dict(repo_id: str, placeholder: bool, config: RunConfig, commits: list[PlannedCommit]) -> dict[str, Any]:
    return {
        "repo_id": repo_id,
        "repo_id_is_placeholder": placeholder,
        "private": config.push.private,
        "what": list(config.push.what),
        "total_files": sum(len(c.files) for c in commits),
        "total_bytes": sum(c.size for c in commits),
        "commits": [
            {"name": c.name, "message": c.message, "bytes": c.size,
             "files": [{"path_in_repo": f.path_in_repo, "source": f.source, "size": f.size, "sha256": f.sha256}
                       for f in c.files]}
            for c in commits
        ],
    }


# ---- the upload -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _hub_errors(doing: str, then: str) -> Iterator[None]:
    """Turn Hub and network errors into a PushError that says what was being done and what to do next."""
    try:
        yield
    except httpx.HTTPError as error:
        response = getattr(error, "response", None)
        status = f"HTTP {response.status_code}" if response is not None else type(error).__name__
        detail = (str(error).strip().splitlines() or [""])[0]
        raise PushError(f"{doing} failed ({status}: {detail}); {then}") from None


def _write_redacted_json(path: Path, data: Any) -> None:
    path.write_text(redact(json.dumps(data, indent=2)) + "\n", encoding="utf-8")


def _files_text(n: int) -> str:
    return f"{n} file" if n == 1 else f"{n} files"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _check_repo(api: HfApi, repo_id: str, config: RunConfig) -> bool:
    """Create the repo, or accept an existing one that medcot made (or is empty). Returns True if created."""
    try:
        info = api.repo_info(repo_id)
    except RepositoryNotFoundError:
        api.create_repo(repo_id, private=config.push.private)
        log.info("push: created %s repo %s", "private" if config.push.private else "public", repo_id)
        return True
    files = [s.rfilename for s in info.siblings or []]
    theirs = [f for f in files if f != ".gitattributes"]
    if theirs and OWNER_FILE not in files:
        if not config.push.allow_foreign_repo:
            raise PushError(
                f"{repo_id} already exists and was not made by medcot (it has {len(theirs)} files and no {OWNER_FILE}); "
                f"pushing would mix this run's files with its own. Choose another push.repo_id, or set "
                f"push.allow_foreign_repo=true to push into it anyway"
            )
        log.warning("push: %s was not made by medcot; pushing into it because push.allow_foreign_repo is true", repo_id)
    if info.private is not None and info.private != config.push.private:
        log.warning("push: %s already exists and is %s; push.private=%s applies only when medcot creates the repo",
                    repo_id, "private" if info.private else "public", config.push.private)
    return False


def _already_there(api: HfApi, repo_id: str, files: list[PlannedFile]) -> set[str]:
    """Paths whose remote copy has the same content: sha256 for LFS files, git's blob sha1 for regular ones."""
    remote = {f.path: f for f in api.get_paths_info(repo_id, [f.path_in_repo for f in files]) if isinstance(f, RepoFile)}
    same = set()
    for f in files:
        r = remote.get(f.path_in_repo)
        if r is None or r.size != f.size:
            continue
        if (r.lfs.sha256 == f.sha256) if r.lfs is not None else (r.blob_id == f.git_oid()):
            same.add(f.path_in_repo)
    return same


def _send(api: HfApi, repo_id: str, commit: PlannedCommit, number: int, total: int) -> dict[str, Any]:
    skip = _already_there(api, repo_id, commit.files)
    todo = [f for f in commit.files if f.path_in_repo not in skip]
    record: dict[str, Any] = {"name": commit.name, "files": len(commit.files), "uploaded": len(todo),
                              "skipped": len(skip), "bytes": sum(f.size for f in todo)}
    if not todo:
        log.info("push: commit %d/%d '%s': all %s already on the Hub, skipped", number, total, commit.name,
                 _files_text(len(skip)))
        return record
    log.info("push: commit %d/%d '%s': uploading %s, %s%s", number, total, commit.name, _files_text(len(todo)),
             _size(record["bytes"]), f" ({len(skip)} already on the Hub)" if skip else "")
    t0 = time.monotonic()
    ops = [CommitOperationAdd(path_in_repo=f.path_in_repo, path_or_fileobj=str(f.local) if f.local else f.content)
           for f in todo]
    info = api.create_commit(repo_id, operations=ops, commit_message=commit.message)
    seconds = time.monotonic() - t0
    record.update(seconds=round(seconds, 2), commit_url=info.commit_url, oid=info.oid)
    log.info("push: commit %d/%d '%s' done in %.1f s (%s/s): %s", number, total, commit.name, seconds,
             _size(record["bytes"] / max(seconds, 1e-3)), info.commit_url)
    return record


def push(config: RunConfig, run_dir: Path | str, token: str | None, *, dry_run: bool, out_dir: Path,
         endpoint: str | None = None) -> dict[str, Any]:
    """Write the plan and card to `out_dir`; unless `dry_run`, check the token and upload, card last.

    A dry run never touches the network. Returns the plan, plus what was uploaded for a real push.
    """
    run = RunDir(run_dir)
    placeholder = dry_run and config.push.repo_id is None
    if placeholder:
        repo_id = placeholder_repo_id(config)
        log.warning("push: push.repo_id is not set; the plan and card use the placeholder %s", repo_id)
    else:
        repo_id = require_repo_id(config)

    # Cheapest checks first: a missing stage (local), then the token (seconds), then hashing (minutes for 16 GB).
    folders, inputs = _sources(config, run)
    user = None if dry_run else preflight(repo_id, token, endpoint)
    t0 = time.monotonic()
    commits = _plan_commits(config, run, repo_id, folders, inputs)
    plan = _plan_dict(repo_id, placeholder, config, commits)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_redacted_json(out_dir / PLAN_FILE, plan)
    for generated in (f for c in commits for f in c.files if f.content is not None):  # medcot.json, README.md
        (out_dir / generated.path_in_repo).write_bytes(generated.content)
    log.info("push: plan for %s: %d commits, %s, %s (hashed in %.1f s)", repo_id, len(commits),
             _files_text(plan["total_files"]), _size(plan["total_bytes"]), time.monotonic() - t0)
    result: dict[str, Any] = {"repo_id": repo_id, "dry_run": dry_run, "inputs": inputs, "plan": plan}
    if dry_run:
        return result

    api = HfApi(endpoint=endpoint, token=token)
    t0 = time.monotonic()
    with _hub_errors(f"preparing {repo_id} on {api.endpoint}", "rerun the push job"):
        created = _check_repo(api, repo_id, config)
    sent: list[dict[str, Any]] = []
    for number, commit in enumerate(commits, 1):
        then = (f"{number - 1} of {len(commits)} commits are done and the model card is not uploaded yet; rerun "
                f"the push job to finish (files already on the Hub are skipped)")
        with _hub_errors(f"commit {number}/{len(commits)} '{commit.name}' to {repo_id}", then):
            sent.append(_send(api, repo_id, commit, number, len(commits)))
    with _hub_errors(f"reading the revision of {repo_id}", "the upload is complete; rerun to record it"):
        revision = api.repo_info(repo_id).sha
    seconds = time.monotonic() - t0
    uploaded = sum(c["bytes"] for c in sent)
    result.update(user=user, url=f"{api.endpoint}/{repo_id}", private=config.push.private, created=created,
                  revision=revision, commits=sent, seconds=round(seconds, 2))
    _write_redacted_json(out_dir / RESULT_FILE, {k: v for k, v in result.items() if k != "plan"})
    log.info("push: %s complete at revision %s: %s, %s uploaded in %.1f s (%d already there)", result["url"],
             revision[:12], _files_text(sum(c["uploaded"] for c in sent)), _size(uploaded), seconds,
             sum(c["skipped"] for c in sent))
    return result


def push_stage(config: RunConfig, token: str | None, *, dry_run: bool, force: bool = False,
               endpoint: str | None = None) -> int:
    """The push job: a dry run writes `<run>/push-dry-run/`; a real push publishes the `push/` stage."""
    started = time.monotonic()
    run = RunDir(config.run_dir)
    if dry_run:
        _, inputs = _sources(config, run)
        config_hash = config.section_hash("push")
        # A dry run has no side effects: redone whenever its config or inputs changed, without --force.
        if run.check_done(DRY_RUN_DIR, config_hash, inputs, force=True):
            log.info("push: the dry run in %s is of this config and these stages; nothing to do", run.stage(DRY_RUN_DIR))
            return 0
        # Published like a stage (written aside, renamed into place), so a killed dry run leaves no half plan.
        with run.publishing(DRY_RUN_DIR, config_hash, inputs, started=started) as (tmp, _):
            push(config, run.root, token, dry_run=True, out_dir=tmp, endpoint=endpoint)
        log.info("push: dry run, nothing uploaded; plan and card in %s", run.stage(DRY_RUN_DIR))
        return 0
    require_repo_id(config)
    _, inputs = _sources(config, run)
    config_hash = config.section_hash("push")
    if run.check_done("push", config_hash, inputs, force):
        log.info("push: %s was already pushed from this run with this config; nothing to do (delete the push folder to push again)",
                 config.push.repo_id)
        return 0
    with run.publishing("push", config_hash, inputs, started=started) as (tmp, manifest):
        result = push(config, run.root, token, dry_run=False, out_dir=tmp, endpoint=endpoint)
        manifest.extra = {"repo_id": result["repo_id"], "url": result["url"], "revision": result["revision"]}
    return 0
