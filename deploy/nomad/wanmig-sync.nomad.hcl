# A Nomad periodic batch job that runs the same command as the systemd
# timer (deploy/systemd/wanmig-sync@.service) for one VM: `wanmig dr sync`.
#
# It runs on the node that runs the VM (the sync is asked of the VM's
# process through its control socket, a unix socket there), with raw_exec.
#   prohibit_overlap = true      no overlapping runs
#   reschedule (exponential)     a failed run is tried again after 30 s,
#                                60 s, ... up to 10 min, on top of
#                                `--retries` inside one run
# Not run by any test (this project runs no Nomad).
job "wanmig-sync-web1" {
  type = "batch"

  periodic {
    crons            = ["*/15 * * * *"]
    prohibit_overlap = true
    time_zone        = "UTC"
  }

  constraint {
    attribute = "${node.unique.name}"
    value     = "host-a"
  }

  group "sync" {
    reschedule {
      attempts       = 3
      interval       = "1h"
      delay          = "30s"
      delay_function = "exponential"
      max_delay      = "10m"
      unlimited      = false
    }

    restart {
      attempts = 0
      mode     = "fail"
    }

    task "sync" {
      driver = "raw_exec"

      config {
        command = "/usr/local/bin/wanmig"
        args = [
          "dr", "sync", "/var/lib/wanmig/web1/vm.toml", "dr.example:4750",
          "--identity", "/etc/wanmig/id", "--peer", "DR_SITE_FINGERPRINT",
          "--retries", "2", "--backoff", "30s", "--store", "/var/lib/wanmig/chunks", "--json",
        ]
      }

      resources {
        cpu    = 500
        memory = 256
      }
    }
  }
}
