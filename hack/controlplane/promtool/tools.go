//go:build tools

// Package tools keeps Prometheus's promtool (package main at
// github.com/prometheus/prometheus/cmd/promtool) in this wrapper module's go.mod/go.sum, so that
// `go build github.com/prometheus/prometheus/cmd/promtool` from here needs nothing but the proxy.
package tools

import _ "github.com/prometheus/prometheus/cmd/promtool"
