"""Worker processes: several reactors accepting SMTP and LMTP on the same sockets.

One Python process runs one reactor thread under one GIL, so a single popgate uses about
one core for its protocol work.  With ``[server] workers = N`` (N > 1) the main process
(the one twistd runs) binds every listener as usual and then starts N - 1 workers
(:mod:`popgate.workers.pool`), each ``python -m popgate.workers`` with:

- the listening sockets of the SMTP, SMTPS and LMTP listeners as inherited file
  descriptors (``haproxy:`` listeners stay in the main process: their PROXY header
  wrapper is not passed on).  Every process accepts on the same socket; the kernel wakes
  them and one wins each connection;
- the effective configuration as TOML (:func:`popgate.config.dump`) on its standard
  input, read to the end before anything starts;
- its standard output as a pipe back to the main process: the worker logs twisted.logger
  events as JSON lines there and the main process publishes them in its own log, so
  every process's lines end up in the one log, formatted by the one observer.

Each worker builds its own store owner (its ``tmp/`` files carry its own owner id under
its own ``flock``), spare files, deliverer, session log and connection caps
(:func:`popgate.service.makeWorkerService`); POP3, submission, the relay queue, the
``tmp/`` sweeps, the dashboard and the metrics stay in the main process.  Mail is safe
to deliver from several processes at once for the same reasons it is across nodes:
unique file names, one ``rename`` each, ``fsync`` before ``250``.

Lifetime: the main process stops its workers with SIGTERM (they drain like it does) and
forwards SIGHUP.  A worker that ends by itself is started again after 1 s, doubling to
at most a minute while it keeps failing at once.  A worker dies with SIGKILL the moment
its main process dies (``PR_SET_PDEATHSIG`` on Linux; elsewhere it polls its parent
every second), so a crashed server leaves no process holding its ports.
"""
