// Command ephysd is the closed-loop electrophysiology daemon. See README.md.
package main

import (
	"os"

	"github.com/ephysd/ephysd/daemon"
)

func main() {
	os.Exit(daemon.Main(os.Args[1:], os.Stdout, os.Stderr))
}
