# Local control plane (etcd + kube-apiserver built from their Go modules, cached in
# ~/.cache/cape-static-ip). Included from the top-level Makefile.
#   make controlplane   build the binaries (once per machine, ~4 min the first time)
#   make cluster        start a cluster in .dev/cluster (stays up), kubeconfig in .dev/kubeconfig
#   make cluster-down   stop it
CONTROLPLANE_DIR := $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))

.PHONY: controlplane cluster cluster-down

controlplane:
	@bash $(CONTROLPLANE_DIR)/build.sh

# etcd and kube-apiserver are detached by cluster.sh: they keep running after make returns.
cluster: controlplane
	@bash $(CONTROLPLANE_DIR)/cluster.sh up .dev/cluster
	@cp .dev/cluster/kubeconfig .dev/kubeconfig
	@echo "export KUBECONFIG=$$(pwd)/.dev/kubeconfig"

cluster-down:
	@bash $(CONTROLPLANE_DIR)/cluster.sh down .dev/cluster
	@rm -f .dev/kubeconfig
