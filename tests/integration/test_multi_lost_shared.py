"""Lost-prompt verdicts from fresh facts, agreed by every replica: two replicas on one real
Redis in front of three fake instances, one of which is killed (or restarted)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from proxy.multi.lost import LOST_EXCEPTION_TYPE
from proxy.tenancy.namespaces import upstream_client_id
from proxy.upstream.pool import POOL
from tests.integration.lost_replicas import Replica, replicas, victim_of
from tests.integration.multi_support import (
    ALICE,
    A,
    Client,
    Fakes,
    connect,
    ended,
    fakes,
    get_json,
    graph,
    multi_proxy,
    place,
    receive_until,
)

__all__ = ["fakes", "multi_proxy", "replicas"]  # fixtures used by name


def error_of(prompt_id: str) -> Callable[[Any], bool]:
    return lambda f: (
        isinstance(f, dict)
        and f.get("type") == "execution_error"
        and f["data"]["prompt_id"] == prompt_id
    )


async def submit(client: Client, client_id: str) -> str:
    async with client.post(
        "/prompt", headers=A, json={"prompt": graph(), "client_id": client_id}
    ) as resp:
        assert resp.status == 200, await resp.text()
        prompt_id: str = (await resp.json())["prompt_id"]
        return prompt_id


async def job_answer(client: Client, prompt_id: str) -> tuple[int, Any]:
    async with client.get(f"/api/jobs/{prompt_id}", headers=A) as resp:
        return resp.status, await resp.json()


async def on_every_instance(fakes: Fakes, client_id: str) -> None:
    sid = upstream_client_id(ALICE, client_id)
    for fake in fakes:
        await fake.wait_socket(sid, flags=True)


async def frames_until_next_prompt(
    replica: Replica, fakes: Fakes, index: int, ws: Any, client_id: str
) -> list[Any]:
    """Every frame the socket gets until a fresh prompt on instance ``index`` ended: whatever
    was to come before it has come."""
    prompt_id = await place(replica.client, fakes[index], ALICE, client_id)
    return await receive_until(ws, ended(prompt_id))


async def test_a_prompt_that_finished_just_before_the_kill_is_not_reported_lost(
    replicas: Callable[..., Any], fakes: Fakes
) -> None:
    r1, r2 = await replicas()
    ws, _ = await connect(r1.client, A, "tab")  # the tab's socket is on replica 1
    await on_every_instance(fakes, "tab")
    for fake in fakes:
        fake.hold()
    prompt = await submit(r1.client, "tab")
    index, victim = victim_of(fakes, prompt)
    await victim.wait_held()
    name = fakes.name(index)
    for fake in fakes:
        if fake is not victim:
            fake.release()
    # Replica 2's snapshot says running; then it finishes, relayed by replica 1 only.
    await r2.lost.refresh(r2.upstream(name))
    victim.release()
    await receive_until(ws, ended(prompt))
    await r1.lost.flush()  # the end is shared (normally within milliseconds, in the background)
    await victim.stop()
    assert prompt in r2.lost.watch.held(name)  # its snapshot is stale: still "running"

    for replica in (r2, r1):  # each sees it down (its health check), replica 2 first
        replica.client.app[POOL].report_failure(replica.upstream(name), "refused")
        assert await replica.lost.instance_lost(replica.upstream(name)) == []

    for replica in (r1, r2):
        assert replica.lost_count(name) == 0
        assert await get_json(replica.client, f"/history/{prompt}", A) == {}
        status, body = await job_answer(replica.client, prompt)
        assert (status, body) == (404, {"error": "Job not found"})  # unreachable, not failed
        failed = await get_json(replica.client, "/api/jobs?status=failed", A)
        assert failed["jobs"] == []
    survivor = next(i for i in range(3) if i != index)
    frames = await frames_until_next_prompt(r1, fakes, survivor, ws, "tab")
    assert not [f for f in frames if error_of(prompt)(f)]
    await ws.close()


async def test_a_lost_prompt_is_answered_the_same_by_both_replicas(
    replicas: Callable[..., Any], fakes: Fakes
) -> None:
    r1, r2 = await replicas()
    ws, _ = await connect(r2.client, A, "tab")  # the socket on replica 2, the POST on 1
    await on_every_instance(fakes, "tab")
    for fake in fakes:
        fake.hold()
    prompt = await submit(r1.client, "tab")
    index, victim = victim_of(fakes, prompt)
    await victim.wait_held()
    name = fakes.name(index)
    for fake in fakes:
        if fake is not victim:
            fake.release()
    assert prompt not in r2.lost.watch.held(name)  # replica 2 has not read that queue since

    await victim.stop()
    for replica in (r2, r1):  # each sees it down (replica 2 holds nothing of it)
        replica.client.app[POOL].report_failure(replica.upstream(name), "refused")
    await r1.lost.instance_lost(r1.upstream(name))
    assert await r1.lost.verdict(prompt) is not None
    await r2.lost.sync()  # replica 2 learns the verdict (at each watch interval)
    frames = await receive_until(ws, error_of(prompt))
    error = frames[-1]["data"]
    assert error["exception_type"] == LOST_EXCEPTION_TYPE
    assert name in error["exception_message"]
    assert await receive_until(ws, ended(prompt))

    entries = [await get_json(r.client, f"/history/{prompt}", A) for r in (r1, r2)]
    assert entries[0] == entries[1]
    assert entries[0][prompt]["status"]["status_str"] == "error"
    assert entries[0][prompt]["status"]["messages"][0][0] == "execution_error"
    jobs = [await job_answer(r.client, prompt) for r in (r1, r2)]
    assert jobs[0] == jobs[1]
    status, job = jobs[0]
    assert status == 200  # a failed job is a job: ComfyUI answers it with 200
    assert job["status"] == "failed"
    assert job["execution_error"] == error
    for replica in (r1, r2):
        listed = await get_json(replica.client, "/api/jobs?status=failed", A)
        assert [j["id"] for j in listed["jobs"]] == [prompt]
        assert set(await get_json(replica.client, "/history", A)) >= {prompt}
    assert r1.lost_count(name) + r2.lost_count(name) == 1  # one verdict, counted once

    # Told once: another sync, or replica 2 deciding from its own (late) read, adds nothing.
    r2.lost.watch.note_submitted(name, prompt)
    assert [v.prompt_id for v in await r2.lost.instance_lost(r2.upstream(name))] == [prompt]
    await r2.lost.sync()
    survivor = next(i for i in range(3) if i != index)
    frames = await frames_until_next_prompt(r2, fakes, survivor, ws, "tab")
    assert not [f for f in frames if error_of(prompt)(f)]
    assert r1.lost_count(name) + r2.lost_count(name) == 1
    await ws.close()


async def test_both_replicas_deciding_agree_on_one_verdict_told_once(
    replicas: Callable[..., Any], fakes: Fakes
) -> None:
    r1, r2 = await replicas()
    ws, _ = await connect(r2.client, A, "tab")
    await on_every_instance(fakes, "tab")
    for fake in fakes:
        fake.hold()
    prompt = await submit(r1.client, "tab")
    index, victim = victim_of(fakes, prompt)
    await victim.wait_held()
    name = fakes.name(index)
    for fake in fakes:
        if fake is not victim:
            fake.release()
    await r2.lost.refresh(r2.upstream(name))  # both replicas hold it

    await victim.stop()  # replica 2 decides on its own (its socket's link drops)
    await receive_until(ws, error_of(prompt))
    decided = await r1.lost.instance_lost(r1.upstream(name))
    verdict = await r2.lost.verdict(prompt)
    assert verdict is not None
    assert decided == [verdict]  # replica 1 adopted replica 2's verdict
    assert r1.lost_count(name) + r2.lost_count(name) == 1
    await r2.lost.sync()
    survivor = next(i for i in range(3) if i != index)
    frames = await frames_until_next_prompt(r2, fakes, survivor, ws, "tab")
    assert not [f for f in frames if error_of(prompt)(f)]
    await ws.close()


async def test_an_instance_that_still_answers_keeps_its_prompts(
    replicas: Callable[..., Any], fakes: Fakes
) -> None:
    """A failed health check is not a dead process: what it still queues is not lost, and a
    prompt its history has finished, whatever an old snapshot said."""
    r1, _ = await replicas()
    fake = fakes[1]
    name = fakes.name(1)
    upstream = r1.upstream(name)
    fake.hold()
    done = await place(r1.client, fake, ALICE)
    await fake.wait_held()
    await r1.lost.refresh(upstream)
    fake.release()
    await fake.wait_idle()
    fake.hold()
    running = await place(r1.client, fake, ALICE)
    await fake.wait_held()
    r1.lost.watch.note_submitted(name, running)
    assert r1.lost.watch.held(name) == {done, running}  # "done" from the stale snapshot

    assert await r1.lost.instance_lost(upstream) == []
    assert r1.lost.watch.held(name) == {running}  # held still: decided when it ends or dies
    assert done in r1.lost.finished
    assert r1.lost_count(name) == 0
    fake.release()


async def test_a_restarted_instance_without_the_prompt_answers_a_failed_job(
    replicas: Callable[..., Any], fakes: Fakes
) -> None:
    """The instance came back empty before the proxy decided: its fresh queue and history do
    not have the prompt, so it was lost; ``/api/jobs/{id}`` answers the failed job with 200
    (the instance's own 404 is not passed on)."""
    r1, r2 = await replicas()
    fakes[1].hold()
    prompt = await place(r1.client, fakes[1], ALICE)
    await fakes[1].wait_held()
    await r1.lost.refresh(r1.upstream(fakes.name(1)))
    await fakes.restart(1)

    (lost,) = await r1.lost.instance_lost(r1.upstream(fakes.name(1)))
    assert lost.prompt_id == prompt
    for replica in (r1, r2):
        status, job = await job_answer(replica.client, prompt)
        assert status == 200
        assert job["status"] == "failed"
        entry = (await get_json(replica.client, f"/history/{prompt}", A))[prompt]
        assert entry["status"]["status_str"] == "error"
