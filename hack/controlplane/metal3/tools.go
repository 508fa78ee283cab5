//go:build tools

// Package tools keeps metal3's ip-address-manager controller (package main at the root of
// github.com/metal3-io/ip-address-manager) in this wrapper module's go.mod/go.sum, so that
// `go build github.com/metal3-io/ip-address-manager` from here needs nothing but the proxy.
package tools

import _ "github.com/metal3-io/ip-address-manager"
