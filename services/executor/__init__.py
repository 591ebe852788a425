"""The executor service, in parts that each do one job and import only the parts before them:

    config -> outbox -> isolation -> steps -> lease -> cancel -> claim -> fetch -> service

- config: the executor's settings;
- outbox: applies outcomes with one finish call per turn (what that call does not take goes
  to the results streams, for admission);
- isolation: worker processes for steps with isolation="process", and the ladder that stops
  them (flag, SIGTERM, SIGKILL);
- steps: runs a claimed run's steps and reports its outcome once (the local slots);
- lease: renews leases on a thread of its own, so a blocked event loop cannot let them lapse;
- cancel: stops local runs on control-stream cancels, and on the heartbeat's answer;
- claim: the claim script over read assignments, and the start of what it grants;
- fetch: reads assignments (never more than free slots) and hands them to claim;
- service: the wiring, start-up, and the SIGTERM drain.
"""
