package daemon

import (
	"fmt"
	"os"
	"testing"
)

// TestMain runs a hidden subcommand instead of the tests when the test
// binary was re-executed as a child (see selfCommand).
func TestMain(m *testing.M) {
	if role := os.Getenv(ReexecEnv); role != "" {
		main, ok := hiddenCommands[role]
		if !ok {
			fmt.Fprintf(os.Stderr, "%s=%s: no such hidden command\n", ReexecEnv, role)
			os.Exit(2)
		}
		os.Exit(main(os.Args[1:], os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}
