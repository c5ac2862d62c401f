# The server's first test shell (configs/vm-group.example.yaml), run in the VM as one command.
echo serving > /tmp/served
migrate-sync send "server.ready=$(cat /proc/sys/kernel/random/boot_id)"
migrate-sync sync all-up
