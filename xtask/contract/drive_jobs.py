"""Drives a job through each daemon with a client generated from its committed OpenAPI
document by openapi-python-client (`cargo xtask contract` generates the clients and runs this).

    drive_jobs.py oma CLIENTS OMA_URL VMA_URL OPERATOR_TOKEN_FILE EVENTS_TOKEN_FILE
    drive_jobs.py watchdog CLIENTS VMA_URL API_TOKEN_FILE

On the OMA: register the VMA, create a job (the OMA starts it on the real watchdog), read it,
read its audit trail, cancel it. On the watchdog: start a job, read it, stop it, and read it
until its process has exited. Every answer is checked for its status and its content; the
first that is wrong ends the run with a message that says which and why.
"""

import sys
import time


def fail(message):
    print(f"drive_jobs: {message}", file=sys.stderr)
    sys.exit(1)


def expect(response, status, what):
    if response.status_code != status:
        fail(f"{what}: HTTP {int(response.status_code)}, expected {status}: {response.content!r}")
    if response.parsed is None:
        fail(f"{what}: the generated client could not read the answer: {response.content!r}")
    return response.parsed


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def drive_oma(oma_url, vma_url, operator_token, events_token):
    from oma_client import AuthenticatedClient
    from oma_client.api.jobs import cancel_job, create_job, get_job, job_audit
    from oma_client.api.vmas import register_vma
    from oma_client.models import CancelRequest, CreateJobRequest, JobStatus, RegisterVma
    from oma_client.models import StartJobRequest

    client = AuthenticatedClient(base_url=oma_url, token=operator_token)
    vma = expect(
        register_vma.sync_detailed(
            "local", client=client, body=RegisterVma(base_url=vma_url, token=events_token)
        ),
        200,
        "register the VMA",
    )
    if vma.id != "local":
        fail(f"registered VMA {vma.id!r}, expected 'local'")
    request = CreateJobRequest(
        vm_context_id="ctx-generated-client",
        vm_name="generated-client-vm",
        vma_id="local",
        id="oma-client-job",
        params=StartJobRequest(vm_path="/Datacenter/vm/generated-client-vm"),
    )
    job = expect(create_job.sync_detailed(client=client, body=request), 201, "create the job")
    if job.status != JobStatus.REPLICATING or not job.pid:
        fail(f"created job is {job.status} with pid {job.pid!r}; expected replicating with a pid")
    read_back = expect(get_job.sync_detailed(job.id, client=client), 200, "read the job")
    if (read_back.id, read_back.pid) != (job.id, job.pid):
        fail(f"read {read_back.id}/{read_back.pid!r}, created {job.id}/{job.pid!r}")
    audit = expect(job_audit.sync_detailed(job.id, client=client), 200, "read the audit trail")
    actions = [entry.action for entry in audit]
    if actions[:1] != ["created"] or "started" not in actions:
        fail(f"audit trail {actions}; expected it to begin with created and hold started")
    cancelled = expect(
        cancel_job.sync_detailed(
            job.id, client=client, body=CancelRequest(reason="generated client test")
        ),
        200,
        "cancel the job",
    )
    if cancelled.status != JobStatus.CANCELLED:
        fail(f"cancelled job is {cancelled.status}")
    again = cancel_job.sync_detailed(job.id, client=client, body=CancelRequest())
    expect(again, 409, "cancel the job again")
    print(f"drive_jobs: oma: job {job.id} created (pid {job.pid}), read, audited "
          f"({len(audit)} entries), cancelled")


def drive_watchdog(vma_url, api_token):
    from vma_client import AuthenticatedClient
    from vma_client.api.jobs import get_job, start_job, stop_job
    from vma_client.models import StartJobRequest, VmaJobStatusType0, VmaJobStatusType1

    client = AuthenticatedClient(base_url=vma_url, token=api_token)
    job_id = "watchdog-client-job"
    started = expect(
        start_job.sync_detailed(job_id, client=client, body=StartJobRequest()),
        201,
        "start the job",
    )
    if not isinstance(started, VmaJobStatusType0) or started.job_id != job_id:
        fail(f"started job reads as {started!r}; expected it running")
    pid = started.process.pid
    running = expect(get_job.sync_detailed(job_id, client=client), 200, "read the job")
    if not isinstance(running, VmaJobStatusType0) or running.process.pid != pid:
        fail(f"read {running!r}; expected pid {pid} running")
    expect(stop_job.sync_detailed(job_id, client=client), 202, "stop the job")
    deadline = time.monotonic() + 30
    while True:
        state = expect(get_job.sync_detailed(job_id, client=client), 200, "read the job")
        if isinstance(state, VmaJobStatusType1):
            break
        if time.monotonic() > deadline:
            fail(f"pid {pid} still runs 30 s after the stop")
        time.sleep(0.2)
    if state.process.pid != pid:
        fail(f"the exited process is pid {state.process.pid}, the started one {pid}")
    print(f"drive_jobs: vma-watchdog: job {job_id} started (pid {pid}), read, stopped, "
          f"exited (code {state.exit_.code!r}, signal {state.exit_.signal!r})")


def main():
    if len(sys.argv) < 3:
        fail(__doc__)
    sys.path.insert(0, sys.argv[2])
    if sys.argv[1] == "oma" and len(sys.argv) == 7:
        drive_oma(sys.argv[3], sys.argv[4], read(sys.argv[5]), read(sys.argv[6]))
    elif sys.argv[1] == "watchdog" and len(sys.argv) == 5:
        drive_watchdog(sys.argv[3], read(sys.argv[4]))
    else:
        fail(__doc__)


if __name__ == "__main__":
    main()
