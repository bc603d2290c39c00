"""Published feedback in a real swarm: two clients' feedback is stored by the learning peer that trained on it,
replicated to another peer and fetched by hash from that one; a shared prompt is published the same way (from
`DistributedModel.share_prompt` and from the API with --share-prompts, signed by the API user's account); every
bad input (no example, oversized, non-UTF-8, forged, another example's hash, another signer, a feedback record
offered as a shared prompt, a forged replica push) is refused with a clear error before any compute, nothing of
it is stored, and the peer keeps serving."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import msgpack
import pytest
import torch
from hivemind.proto import runtime_pb2

from peer.feedback_store import fetch_feedback, push_feedback
from swarm import protocol
from swarm.contributors import ContributorKey
from swarm.feedback_records import MAX_FEEDBACK_BYTES, sign_example
from swarm.protocol import InvalidRequestError
from swarm.tensors import encode
from tests.peer.learning_swarm import FACTS, learning_args, peer_info, wait_until

pytestmark = pytest.mark.timeout(300)


def _backward_request(
    model, peer_id: str, key: ContributorKey, example: dict | None, signed_hash: bytes | None
) -> runtime_pb2.ExpertRequest:
    """A training backward for blocks 0:8 of `peer_id`, signed by `key` naming `signed_hash`, carrying `example`."""
    hidden = model.config.hidden_size
    tensors = [encode(torch.randn(1, 4, hidden)), encode(torch.randn(1, 4, hidden) * 1e-3)]
    metadata = {"model": model.model_name, "blocks": [0, 8], "train": True}
    metadata["contributor"] = key.sign_pass(model.model_name, peer_id, (0, 8), tensors, signed_hash)
    if example is not None:
        metadata["example"] = example
    return runtime_pb2.ExpertRequest(tensors=tensors, metadata=protocol.pack_metadata(metadata))


def test_feedback_is_published_replicated_fetched_and_bad_input_refused(local_swarm, tiny_model_path):
    from swarm.client import ClientConfig, DistributedModel, GenerationParams

    learner = local_swarm.start_peer("0:8", *learning_args(60.0), "--data-batch-size", "1", name="learner", wait=False)
    holder = local_swarm.start_peer("0:8", "--data-batch-size", "1", name="holder", wait=False)  # frozen: never trains
    for peer in (learner, holder):
        local_swarm.wait_ready(peer, timeout=120)
    ids = {"learner": learner.info["peer_id"], "holder": holder.info["peer_id"]}
    dave, eve = ContributorKey.from_uri("//Dave"), ContributorKey.from_uri("//Eve")
    clients = [
        DistributedModel.from_pretrained(
            str(tiny_model_path), local_swarm.initial_peers, config=ClientConfig(contributor_key=uri, max_retries=0)
        )
        for uri in ("//Dave", "//Eve")
    ]
    try:
        # 1. two clients' feedback: trained on by the learner, stored there, replicated to the holder
        sent = []
        for client, (prompt, completion) in zip(clients, FACTS, strict=True):
            client.feedback(prompt, completion)
            sent.append((client.core.contributor().account, prompt, completion))
        model = clients[0]
        stats = wait_until(
            lambda: (s := peer_info(model, ids["learner"])["feedback_store"])["unreplicated"] == 0 and s,
            30,
            "replication",
        )
        assert (stats["records"], stats["uncommitted"]) == (2, 2)  # no chain key here: stored, not committed

        def held(peer: str, hashes: list[bytes]):
            return model._loop.run(fetch_feedback(model.core.p2p, ids[peer], hashes))

        assert held("learner", [b"\x00" * 32]) == []  # an unknown hash: reported missing, nothing served
        hashes = stored(local_swarm, "learner")
        records = held("holder", list(hashes))  # fetched by hash from the OTHER peer
        assert sorted((e.contributor, e.prompt, e.completion) for e in records) == sorted(sent)
        assert {e.content_hash() for e in records} == set(hashes) and set(hashes.values()) == {"feedback"}
        assert held("learner", list(hashes)) == records
        assert peer_info(model, ids["holder"])["feedback_store"]["records"] == 2  # 2 peers hold each example

        # 2. a shared prompt (--share-prompts): published the same way, of its own kind, never trained on
        target = model.share_prompt("What is 2+2?", " 4")
        name = next(n for n, i in ids.items() if i == target)
        shared = [h for h, kind in stored(local_swarm, name).items() if kind == "shared-prompt"]
        assert len(shared) == 1
        (record,) = held(name, shared)
        assert (record.prompt, record.completion, record.contributor) == ("What is 2+2?", " 4", dave.account)
        wait_until(lambda: peer_info(model, target)["feedback_store"]["unreplicated"] == 0, 30, "shared replication")

        # ... and through `dllm api --share-prompts` (the app in process), signed by the API user's own account
        from fastapi.testclient import TestClient

        from swarm.api import create_app

        ferdie = ContributorKey.from_uri("//Ferdie")
        app = create_app(clients[1], {"user-key-0123456789abcdef": ferdie}, share_prompts=True)
        with TestClient(app) as http:
            body = {"model": model.model_name, "prompt": "The sky is", "max_tokens": 2, "temperature": 0}
            answer = http.post(
                "/v1/completions", json=body, headers={"Authorization": "Bearer user-key-0123456789abcdef"}
            )
            assert answer.status_code == 200, answer.text

            def shared_by_ferdie():
                found = {h for n in ids for h, kind in stored(local_swarm, n).items() if kind == "shared-prompt"}
                return [
                    e
                    for e in held("learner", list(found)) + held("holder", list(found))
                    if e.contributor == ferdie.account
                ]

            (api_record, *_) = wait_until(shared_by_ferdie, 30, "the API's shared prompt")
        assert (api_record.prompt, api_record.completion) == ("The sky is", answer.json()["choices"][0]["text"])
        wait_until(
            lambda: all(peer_info(model, i)["feedback_store"]["unreplicated"] == 0 for i in ids.values()),
            30,
            "replication",
        )

        # 3. bad inputs, each refused before compute with a clear error; nothing of them is stored
        peer_id = ids["learner"]
        good = sign_example(dave.keypair, model.model_name, "Q: capital of France? A:", " Paris")
        other = sign_example(dave.keypair, model.model_name, "Q: capital of Italy? A:", " Rome")
        forged = dataclasses.replace(good, completion=" Berlin").to_json()
        oversized = dict(good.to_json(), prompt="x" * (MAX_FEEDBACK_BYTES + 1))
        not_text = dict(good.to_json(), prompt=b"\xff\xfe not utf-8")
        wrong_kind = sign_example(dave.keypair, model.model_name, "p", " c", kind="shared-prompt")
        attacks = {
            "must carry its feedback example": (dave, None, None),
            "at most 16384": (dave, oversized, good.content_hash()),
            "must be UTF-8 text": (dave, not_text, good.content_hash()),
            "signature does not verify": (dave, forged, good.content_hash()),
            "does not name the content hash": (dave, other.to_json(), good.content_hash()),
            "one account signs both": (eve, good.to_json(), good.content_hash()),
            "must be of kind 'feedback'": (dave, wrong_kind.to_json(), wrong_kind.content_hash()),
        }
        for message, (key, example, signed_hash) in attacks.items():
            request = _backward_request(model, peer_id, key, example, signed_hash)
            with pytest.raises(InvalidRequestError, match=message):
                model._loop.run(model.core.call(peer_id, protocol.HANDLER_BACKWARD, request))
        # invalid UTF-8 inside a msgpack string: the whole request is refused as malformed
        raw = msgpack.packb({"model": model.model_name, "train": True, "example": {"prompt": "PLACEHOLDER"}})
        raw = raw.replace(b"PLACEHOLDER", b"\xff\xfePLACEHOL\xc3")
        with pytest.raises(InvalidRequestError, match="utf-8"):
            model._loop.run(
                model.core.call(peer_id, protocol.HANDLER_BACKWARD, runtime_pb2.ExpertRequest(metadata=raw))
            )
        # a feedback record offered as a shared prompt, and a forged record pushed as a replica
        share = runtime_pb2.ExpertRequest(metadata=protocol.pack_metadata({"example": good.to_json()}))
        with pytest.raises(InvalidRequestError, match="takes records of kind 'shared-prompt'"):
            model._loop.run(model.core.call(peer_id, protocol.HANDLER_FEEDBACK_SHARE, share))
        with pytest.raises(InvalidRequestError, match="signature does not verify"):
            model._loop.run(push_feedback(model.core.p2p, peer_id, [dataclasses.replace(good, prompt="x")]))
        empty = runtime_pb2.ExpertRequest(metadata=protocol.pack_metadata({"hashes": []}))
        with pytest.raises(InvalidRequestError, match="1..64 content hashes"):
            model._loop.run(model.core.call(peer_id, protocol.HANDLER_FEEDBACK_FETCH, empty))
        assert held("learner", [good.content_hash(), other.content_hash()]) == []
        assert peer_info(model, peer_id)["feedback_store"]["records"] == 4  # its 2, and the 2 shared prompts

        # 4. the peer serves on: honest feedback is still trained on and published
        clients[1].feedback(*FACTS[0])
        assert peer_info(model, peer_id)["feedback_store"]["records"] == 5

        # 5. `dllm query --share-prompts` publishes its prompt and answer; without the flag nothing is kept
        def shared_count() -> int:  # distinct shared records, wherever held
            return len({h for n in ids for h, kind in stored(local_swarm, n).items() if kind == "shared-prompt"})

        before = shared_count()
        model.generate("A private question", GenerationParams(max_new_tokens=2))  # not shared: kept nowhere
        query = subprocess.run(
            [sys.executable, "-m", "dllm.cli", "query", "The sky is", "-n", "2", "--no-stream", "--share-prompts",
             "--model", str(tiny_model_path), "--initial-peers", local_swarm.initial_peers[0]],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert query.returncode == 0 and "prompt shared (public)" in query.stderr, query.stdout + query.stderr
        assert shared_count() == before + 1
    finally:
        for client in clients:
            client.close()


def stored(local_swarm, name: str) -> dict[bytes, str]:
    """Content hash -> kind of every record in the named peer's store file (read from its data dir)."""
    import sqlite3

    (path,) = (local_swarm.workdir / f"data-{name}").glob("feedback-*.sqlite3")
    with sqlite3.connect(path) as db:
        return {bytes(h): kind for h, kind in db.execute("SELECT hash, kind FROM examples ORDER BY seq")}
