// Command kube-fim-controlplane is one multi-call binary holding the pinned
// Kubernetes control plane that kube-fim's tests and demo run against: etcd,
// kube-apiserver and kube-controller-manager, plus the node components that run
// real pods next to it (kubelet, kube-scheduler, kube-proxy), built from
// upstream Go modules.
//
// Usage: kube-fim-controlplane <component> [flags...]
//
// One binary instead of three shares the compile and link work (the bulk of a
// cold build) and keeps the cache small.
package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"syscall"

	"go.etcd.io/etcd/server/v3/etcdmain"
	"k8s.io/component-base/cli"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	proxy "k8s.io/kubernetes/cmd/kube-proxy/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
	kubelet "k8s.io/kubernetes/cmd/kubelet/app"
)

func main() {
	dieWithParent()
	component := filepath.Base(os.Args[0])
	args := os.Args
	if component == "kube-fim-controlplane" {
		if len(args) < 2 {
			fmt.Fprintln(os.Stderr, "usage: kube-fim-controlplane <"+components+"> [flags...]")
			os.Exit(2)
		}
		component = args[1]
		args = args[1:]
	}
	switch component {
	case "etcd":
		etcdmain.Main(args)
	case "kube-apiserver":
		os.Args = args
		os.Exit(cli.Run(apiserver.NewAPIServerCommand()))
	case "kube-controller-manager":
		os.Args = args
		os.Exit(cli.Run(controllermanager.NewControllerManagerCommand()))
	case "kube-scheduler":
		os.Args = args
		os.Exit(cli.Run(scheduler.NewSchedulerCommand()))
	case "kube-proxy":
		os.Args = args
		os.Exit(cli.Run(proxy.NewProxyCommand()))
	case "kubelet":
		os.Args = args
		os.Exit(cli.Run(kubelet.NewKubeletCommand()))
	case "version":
		fmt.Println(kubernetesVersion)
	default:
		fmt.Fprintf(os.Stderr, "unknown component %q (want one of %s)\n", component, components)
		os.Exit(2)
	}
}

const components = "etcd|kube-apiserver|kube-controller-manager|kube-scheduler|kube-proxy|kubelet"

// kubernetesVersion is set at link time by e2e/controlplane/build.sh.
var kubernetesVersion = "unknown"

// dieWithParent makes the kernel send SIGTERM to this process when the process
// that started it dies, if KUBE_FIM_PARENT_PID names that process. The test
// harness sets it so that a killed test run never leaves a control plane behind.
func dieWithParent() {
	want, err := strconv.Atoi(os.Getenv("KUBE_FIM_PARENT_PID"))
	if err != nil {
		return
	}
	if _, _, errno := syscall.RawSyscall(syscall.SYS_PRCTL, syscall.PR_SET_PDEATHSIG, uintptr(syscall.SIGTERM), 0); errno != 0 {
		return
	}
	// The parent may have died before the prctl took effect.
	if os.Getppid() != want {
		os.Exit(1)
	}
}
