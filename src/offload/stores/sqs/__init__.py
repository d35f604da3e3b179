"""The Amazon SQS store: web processes on many machines enqueue, `offload worker` processes
on other machines perform the calls. SQS is the distributed engine; offload adds the retry
policy, the throttle gates and a dead-letter record SQS does not keep.

    sqs://NAME?region=eu-west-1&endpoint_url=http://127.0.0.1:5000&dlq=NAME-dlq
              &max_receives=10&wait=1&create=true&lease_timeout=60

`region` and `endpoint_url` default to boto3's own (AWS_DEFAULT_REGION, AWS_ENDPOINT_URL);
credentials come from boto3's chain, never from the URL. Standard queues only: a FIFO
queue cannot delay single messages, which retries need.

Trust. A worker performs what a message names, any importable function included, with
the message's arguments: whoever may send to the queue may run code on the workers. The
queue's IAM policy is the boundary (see the README's "Scaling out").

Failures. Every SQS request is tried once (offload's one retry layer: botocore's own
retries are off, as for AwsCall); a failed one raises StoreError. Every step that moves
a task sends before it deletes, so a crash between the two duplicates a task, never
loses one. SQS standard queues order only roughly: "oldest first" is best effort.

The parts, each with the design notes of its job: `store.py` (SqsStore: leases as
visibility timeouts, retries as re-sends), `messages.py` (task messages and dead-letter
records), `queues.py` (the client, opening or making the queues, batch requests),
`letters.py` (the dead-letter queue, listed without consuming it). Their names are this
package's internals; SqsStore and task_record are its public ones.
"""

from .messages import task_record
from .store import SqsStore

__all__ = ["SqsStore", "task_record"]
