"""`internvl-chat push`: huggingface_hub's real upload path (create_repo, preupload, LFS batch + PUT, commit) runs
against an HTTP stub installed at the client boundary (`huggingface_hub.set_client_factory` with the HTTP library's
MockTransport); we assert the exact files sent, the commits and the card metadata (parsed by `ModelCard`)."""

import base64
import json
import sys

import pytest
import torch
from safetensors.torch import save_file

from internvl_chat.hub import push as push_module

COMMITS = ["1" * 40, "2" * 40]


class HubStub:
    """Answers the Hub endpoints a model upload calls and records what was sent."""

    def __init__(self, httpmod):
        self.httpmod = httpmod
        self.requests = []
        self.commits = []  # list of {path: ("regular", bytes) | ("lfs", oid)}
        self.lfs_puts = {}
        self.repo_create = None

    def __call__(self, request):
        http = self.httpmod
        body = request.read()
        path = request.url.path
        self.requests.append((request.method, str(request.url)))
        if path == "/api/repos/create":
            self.repo_create = json.loads(body)
            return http.Response(200, json={"url": "https://huggingface.co/me/tiny", "name": "me/tiny"})
        if "/branch/" in path:
            return http.Response(200, json={})
        if path == "/api/validate-yaml":
            return http.Response(200, json={})
        if "/preupload/" in path:
            files = json.loads(body)["files"]
            modes = [
                {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular"}
                for f in files
            ]
            return http.Response(200, json={"files": [dict(m, shouldIgnore=False) for m in modes]})
        if path.endswith("/info/lfs/objects/batch"):
            objects = json.loads(body)["objects"]
            actions = [
                {"oid": o["oid"], "size": o["size"], "actions": {"upload": {"href": f"https://lfs.test/{o['oid']}"}}}
                for o in objects
            ]
            return http.Response(200, json={"transfer": "basic", "objects": actions})
        if request.method == "PUT" and request.url.host == "lfs.test":
            self.lfs_puts[path.strip("/")] = body
            return http.Response(200)
        if "/commit/" in path:
            files = {}
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    files[item["value"]["path"]] = ("regular", base64.b64decode(item["value"]["content"]))
                elif item["key"] == "lfsFile":
                    files[item["value"]["path"]] = ("lfs", item["value"]["oid"])
            self.commits.append(files)
            oid = COMMITS[len(self.commits) - 1]
            return http.Response(
                200, json={"commitUrl": f"https://huggingface.co/me/tiny/commit/{oid}", "commitOid": oid}
            )
        return http.Response(404, json={"error": f"unexpected {request.method} {request.url}"})


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    # [IMPORTANT] with hf_xet installed, LFS files go through Xet, whose Rust client does its own networking;
    # disabling it keeps every byte of the upload on the Python HTTP client we stub.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    # hub 2.x uses httpx2, hub 1.x httpx: take the library the session is built with.
    httpmod = sys.modules[type(_http.get_session()).__module__.split(".")[0]]
    stub = HubStub(httpmod)
    huggingface_hub.set_client_factory(lambda: httpmod.Client(transport=httpmod.MockTransport(stub)))
    yield stub
    huggingface_hub.set_client_factory(_http.default_client_factory)


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    config = {
        "model_type": "internvl_chat_llava",
        "vision_config": {"model_type": "clip_vision_model"},
        "text_config": {"model_type": "llama"},
        "template": "vicuna_v1",
        "image_seq_length": 576,
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "conversion.json").write_text(json.dumps({"format": "llava"}))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "modeling_internvl_chat.py").write_text("# code\n")
    save_file({"a": torch.zeros(4)}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.ones(4)}, str(folder / "model-00002-of-00002.safetensors"))
    (folder / "model.safetensors.index.json").write_text("{}")
    (folder / "eval_results.json").write_text(
        json.dumps({"results": {"textvqa": {"accuracy": 58.2}, "pope": {"f1": 85.9, "per_category": {"x": 1}}}})
    )
    # Must all stay out: pickles, optimizer / trainer state, checkpoints in progress, caches.
    for name in ("pytorch_model.bin", "optimizer.pt", "scheduler.pt", "training_args.bin", "rng_state_0.pth"):
        (folder / name).write_bytes(b"\x80\x04pickle")
    (folder / "trainer_state.json").write_text("{}")
    for sub in ("checkpoint-100", "global_step100", "__pycache__"):
        (folder / sub).mkdir()
        (folder / sub / "model.safetensors").write_bytes(b"x")
    return folder


EXPECTED = {
    "config.json",
    "conversion.json",
    "eval_results.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
    "modeling_internvl_chat.py",
    "tokenizer.json",
}
CARD_ARGS = dict(
    base_model=["liuhaotian/llava-v1.5-7b"], datasets=["liuhaotian/LLaVA-Instruct-150K"], license="llama2"
)


def test_upload_through_huggingface_hub(hub, model_dir):
    from huggingface_hub import ModelCard

    result = push_module.push(model_dir, "me/tiny", private=True, token="hf_test", **CARD_ARGS)
    assert hub.repo_create["name"] == "tiny"
    # hub 1.x sends `private`, hub 2.x `visibility`
    assert hub.repo_create.get("private") is True or hub.repo_create.get("visibility") == "private"
    assert len(hub.commits) == 2
    files, card_commit = hub.commits
    assert set(files) == EXPECTED
    assert {p for p, (kind, _) in files.items() if kind == "lfs"} == {
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    }
    # The LFS objects that were PUT are the files' bytes, addressed by their sha256.
    import hashlib

    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        data = (model_dir / name).read_bytes()
        assert hub.lfs_puts[hashlib.sha256(data).hexdigest()] == data
    assert files["config.json"][1] == (model_dir / "config.json").read_bytes()
    assert set(card_commit) == {"README.md"}

    card = ModelCard(card_commit["README.md"][1].decode())
    data = card.data
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "image-text-to-text"
    assert data.base_model == ["liuhaotian/llava-v1.5-7b"]
    assert data.datasets == ["liuhaotian/LLaVA-Instruct-150K"]
    assert data.license == "llama2"
    assert "custom_code" in data.tags
    results = {(r.dataset_type, r.metric_type): r.metric_value for r in data.eval_results}
    assert results == {("textvqa", "accuracy"): 58.2, ("pope", "f1"): 85.9}
    assert card.data.to_dict()["model-index"][0]["results"][0]["task"]["type"] == "image-text-to-text"
    # The snippet pins the commit holding the weights and code, and needs trust_remote_code.
    assert f'"me/tiny", revision="{COMMITS[0]}", trust_remote_code=True' in card.text
    assert result["commit"] == COMMITS[0]


def test_revision_creates_branch_and_commits_there(hub, model_dir):
    push_module.push(model_dir, "me/tiny", revision="v1", token="hf_test", **CARD_ARGS)
    branch = [url for method, url in hub.requests if method == "POST" and "/branch/" in url]
    assert branch and branch[0].endswith("/api/models/me/tiny/branch/v1")
    commits = [url for method, url in hub.requests if "/commit/" in url]
    assert all(url.endswith("/commit/v1") for url in commits) and len(commits) == 2


def test_dry_run_prints_plan_and_card_without_network(hub, model_dir, capsys):
    from huggingface_hub import ModelCard

    assert push_module.main([str(model_dir), "--repo-id", "me/tiny", "--dry-run", "--license", "mit"]) == 0
    assert hub.requests == []
    out = capsys.readouterr().out
    plan, card_text = out.split("\n\n", 1)
    uploaded = {line.split()[1] for line in plan.splitlines() if line.startswith("  + ")}
    left_out = {line.split()[1] for line in plan.splitlines() if line.startswith("  - ")}
    assert uploaded == EXPECTED
    assert {"pytorch_model.bin", "optimizer.pt", "training_args.bin", "checkpoint-100", "global_step100"} <= left_out
    card = ModelCard(card_text)
    assert card.data.license == "mit" and card.data.library_name == "transformers"
    assert push_module.PIN_PLACEHOLDER in card.text


@pytest.fixture
def hostile_dir(model_dir, tmp_path):
    """The model folder plus what must never leave the machine: dotfiles, links out of the folder, stray files."""
    secrets = tmp_path / "home"
    (secrets / ".ssh").mkdir(parents=True)
    (secrets / ".ssh" / "id_rsa").write_text("PRIVATE KEY")
    (secrets / "notes.json").write_text('{"token": "hf_secret"}')
    (model_dir / ".env").write_text("HF_TOKEN=hf_secret\n")
    (model_dir / ".hidden").mkdir()
    (model_dir / ".hidden" / "config.json").write_text("{}")
    (model_dir / "leak.json").symlink_to(secrets / "notes.json")  # a model-file name, target outside
    (model_dir / "ssh").symlink_to(secrets / ".ssh", target_is_directory=True)
    (model_dir / "alias.json").symlink_to(model_dir / "config.json")  # stays inside: fine
    (model_dir / "train.log").write_text("loss 1.0\n")
    (model_dir / "adapter").mkdir()
    (model_dir / "adapter" / "adapter_config.json").write_text("{}")
    return model_dir


def test_upload_plan_keeps_only_model_files_inside_the_folder(hostile_dir):
    files, skipped = push_module.upload_plan(hostile_dir)
    assert {str(p) for p in files} == EXPECTED | {"alias.json", "adapter/adapter_config.json"}
    reasons = {str(p): why for p, why in skipped}
    assert reasons[".env"] == "hidden file" and reasons[".hidden"] == "hidden folder"
    assert reasons["leak.json"] == "symlink to a file outside the folder"
    assert reasons["ssh"] == "symlinked folder, not followed"
    assert reasons["train.log"] == "not a model file"


def test_hostile_folder_upload_sends_no_secret(hub, hostile_dir):
    push_module.push(hostile_dir, "me/tiny", token="hf_test", **CARD_ARGS)
    files = hub.commits[0]
    assert set(files) == EXPECTED | {"alias.json", "adapter/adapter_config.json"}
    sent = b"".join(data for kind, data in files.values() if kind == "regular") + b"".join(hub.lfs_puts.values())
    assert b"hf_secret" not in sent and b"PRIVATE KEY" not in sent


def test_dry_run_lists_what_is_left_out_and_why(hub, hostile_dir, capsys):
    assert push_module.main([str(hostile_dir), "--repo-id", "me/tiny", "--dry-run"]) == 0
    assert hub.requests == []
    plan = capsys.readouterr().out.split("\n\n", 1)[0]
    left_out = {
        line.split()[1]: line.split("(left out: ", 1)[1] for line in plan.splitlines() if line.startswith("  - ")
    }
    assert left_out[".env"] == "hidden file)" and left_out["leak.json"] == "symlink to a file outside the folder)"
    assert left_out["ssh"] == "symlinked folder, not followed)"
    uploaded = {line.split()[1] for line in plan.splitlines() if line.startswith("  + ")}
    assert ".env" not in uploaded and "leak.json" not in uploaded
