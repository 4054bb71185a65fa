package daemon

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"testing"
)

// Hidden subcommands are roles the ephysd binary plays for itself in a
// child process (a fake device of the benchmarks, a worker of an isolated
// Python stage). They are not in the usage text: users never run them.
var hiddenCommands = map[string]func(args []string, stdout, stderr io.Writer) int{}

// registerHidden adds a hidden subcommand; call it from an init function.
func registerHidden(name string, main func(args []string, stdout, stderr io.Writer) int) {
	if _, dup := hiddenCommands[name]; dup {
		panic("daemon: hidden command " + name + " registered twice")
	}
	hiddenCommands[name] = main
}

// ReexecEnv names the hidden subcommand a re-executed test binary plays:
// under `go test` the running executable is the test binary, whose
// TestMain (daemon/main_test.go) dispatches on it instead of running the
// tests.
const ReexecEnv = "EPHYSD_REEXEC"

// selfCommand returns a command that runs the hidden subcommand role with
// args in a child process of this executable: `ephysd role args...`, or,
// in a test binary, the binary itself with ReexecEnv=role.
func selfCommand(role string, args ...string) (*exec.Cmd, error) {
	if _, ok := hiddenCommands[role]; !ok {
		return nil, fmt.Errorf("no hidden command %q", role)
	}
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("finding the ephysd executable to start its %s child: %w", role, err)
	}
	if testing.Testing() {
		cmd := exec.Command(exe, args...)
		cmd.Env = append(os.Environ(), ReexecEnv+"="+role)
		return cmd, nil
	}
	return exec.Command(exe, append([]string{role}, args...)...), nil
}
