"""Autotest's multi-host migration example (../shared/seeds/002, "Example:"), pasted as is.

Two changes, both needed under Autotest too: ``import time`` (a control file's own import),
and the seed's ``super(testMultihostMigration, self)`` spelled with the class's name
(``testMultihostMigration`` is a NameError in any Python). Everything else below the marker
is the seed's text: ``def migration_scenario`` and its ``def`` callbacks run in worker
threads, where migrator's calls block; ``migrate-run`` executes the file once per pair (or
once with ``-a all``), with ``test``, ``params``, ``env`` and ``virt_utils`` set.
"""
import time

# ---- the seed, pasted ----
class TestMultihostMigration(virt_utils.MultihostMigration):
    def __init__(self, test, params, env):
        super(TestMultihostMigration, self).__init__(test, params, env)

    def migration_scenario(self):
        srchost = self.params.get("hosts")[0]
        dsthost = self.params.get("hosts")[1]

        def worker(mig_data):
            vm = env.get_vm("vm1")
            session = vm.wait_for_login(timeout=self.login_timeout)
            session.sendline("nohup dd if=/dev/zero of=/dev/null &")
            session.cmd("killall -0 dd")

        def check_worker(mig_data):
            vm = env.get_vm("vm1")
            session = vm.wait_for_login(timeout=self.login_timeout)
            session.cmd("killall -9 dd")

        # Almost synchronized migration, waiting to end it.
        # Work is started only on first VM.

        self.migrate_wait(["vm1", "vm2"], srchost, dsthost,
                          worker, check_worker)

        # Migration started in different threads.
        # It allows to start multiple migrations simultaneously.

        # Starts one migration without synchronization with work.
        mig1 = self.migrate(["vm1"], srchost, dsthost,
                            worker, check_worker)

        time.sleep(20)

        # Starts another test simultaneously.
        mig2 = self.migrate(["vm2"], srchost, dsthost)
        # Wait for mig2 finish.
        mig2.join()
        mig1.join()

mig = TestMultihostMigration(test, params, env)
# Start test.
mig.run()
