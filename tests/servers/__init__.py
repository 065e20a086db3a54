"""Start and stop REAL Redis and SeaweedFS (S3) servers for the tests.

Both servers listen on free loopback ports, write their logs under a given
directory and are stopped by the PID we started (never by process name).
"""

from tests.servers.ports import SEAWEED_GRPC_OFFSET, free_port, free_seaweed_ports
from tests.servers.process import LOG_TAIL_LINES, ServerStartError, pid_alive
from tests.servers.redis_server import RedisServer
from tests.servers.seaweed_server import SeaweedS3, find_weed

__all__ = [
    "LOG_TAIL_LINES",
    "SEAWEED_GRPC_OFFSET",
    "RedisServer",
    "SeaweedS3",
    "ServerStartError",
    "find_weed",
    "free_port",
    "free_seaweed_ports",
    "pid_alive",
]
