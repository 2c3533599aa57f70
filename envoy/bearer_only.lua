-- Refuses any Authorization that is not a Bearer token: api_key_auth also takes a bare `Authorization: <key>`
-- (it strips an optional "Bearer "), so without this a key could travel in any scheme. MESSAGE (the OpenAI-shaped
-- 401 body) is defined by the template. gRPC clients get UNAUTHENTICATED as trailers-only, so every RPC shape
-- (unary, streaming, bidi such as server reflection) sees the same status.
function envoy_on_request(handle)
  local auth = handle:headers():get("authorization")
  if auth == nil or auth:sub(1, 7) == "Bearer " then
    return
  end
  local content_type = handle:headers():get("content-type") or ""
  if content_type:sub(1, 16) == "application/grpc" then
    handle:respond({[":status"] = "200", ["content-type"] = "application/grpc", ["grpc-status"] = "16",
                    ["grpc-message"] = "Authorization must be a Bearer token"}, "")
  else
    handle:respond({[":status"] = "401"}, MESSAGE)
  end
end
