//go:build tools

// Package tools keeps Cluster API's clusterctl (package main at
// sigs.k8s.io/cluster-api/cmd/clusterctl) in this wrapper module's go.mod/go.sum, so that
// `go build sigs.k8s.io/cluster-api/cmd/clusterctl` from here needs nothing but the proxy.
package tools

import _ "sigs.k8s.io/cluster-api/cmd/clusterctl"
