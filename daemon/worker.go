package daemon

import (
	"io"
	"os/exec"

	"github.com/ephysd/ephysd/pyrt/isolated"
)

// The worker process of an isolated Python stage ([[stage]] isolation =
// "process") is this binary run as the hidden subcommand `ephysd
// stage-worker`, with its shared memory, eventfds and control socket
// inherited from the daemon (pyrt/isolated).
func init() {
	registerHidden(isolated.WorkerRole, func(args []string, stdout, stderr io.Writer) int {
		return isolated.WorkerMain(stderr)
	})
}

// workerCommand is the command factory of isolated stages: this
// executable as a stage worker.
func workerCommand() (*exec.Cmd, error) { return selfCommand(isolated.WorkerRole) }
