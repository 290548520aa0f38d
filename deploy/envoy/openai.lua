-- The OpenAI surface of the edge, around grpc_json_transcoder.
--
-- Requests: OpenAI clients send streamed and whole requests to the same path and
-- mark streams with "stream": true in the body; those go to the :stream binding.
-- Responses: every error the transcoder or the router returns becomes an
-- OpenAI-shaped body {"error": {"message", "type", "param", "code"}}.

local STREAMABLE = {
  ["/v1/chat/completions"] = true, ["/v1/completions"] = true, ["/v1/messages"] = true, ["/v1/responses"] = true,
}

-- TYPES[status] = {type, code}; the generator fills it from services/runtime/openai_errors.py.
local TYPES = {
%%ERROR_TYPES%%
}
-- Anthropic's Messages route answers errors in Anthropic's shape: ANTHROPIC_TYPES[status] = type.
local MESSAGES_PATH = "/v1/messages"
local ANTHROPIC_TYPES = {
%%ANTHROPIC_TYPES%%
}
local EDGE_METADATA = "meshserve.edge"

local function is_grpc(headers)
  local ct = headers:get("content-type") or ""
  return ct:find("application/grpc", 1, true) ~= nil
end

-- The request's model goes in a header for per-model rate limits; a client's own value never survives.
local MODEL_HEADER = "%%MODEL_HEADER%%"
local LLM_PREFIX = "/%%LLM_SERVICE%%/"
local OPENAI_PREFIX = "/%%OPENAI_SERVICE%%/"
-- Where the json_to_metadata filter before this one puts the body's top-level "model" and "stream",
-- read by a real JSON parser (escapes decoded, nested keys ignored), as the transcoder reads them.
local BODY_METADATA = "%%BODY_METADATA%%"

-- A protobuf varint at s[i]: value, next index (nil when truncated).
local function varint(s, i)
  local value, scale = 0, 1
  while i <= #s do
    local b = s:byte(i)
    i = i + 1
    value = value + (b % 128) * scale
    if b < 128 then
      return value, i
    end
    scale = scale * 128
  end
  return nil, i
end

-- Every length-delimited field number `want` in s[from..to], in order: a list of {first, last};
-- nil when the bytes are not a well-formed message.
local function pb_fields(s, from, to, want)
  local found = {}
  local i = from
  while i <= to do
    local key
    key, i = varint(s, i)
    if key == nil then
      return nil
    end
    local number, wire = math.floor(key / 8), key % 8
    if wire == 0 then
      local v
      v, i = varint(s, i)
      if v == nil then
        return nil
      end
    elseif wire == 1 then
      i = i + 8
    elseif wire == 5 then
      i = i + 4
    elseif wire == 2 then
      local len
      len, i = varint(s, i)
      if len == nil or i + len - 1 > to then
        return nil
      end
      if number == want then
        found[#found + 1] = {i, i + len - 1}
      end
      i = i + len
    else
      return nil
    end
  end
  if i ~= to + 1 then
    return nil
  end
  return found
end

-- The first message of an uncompressed gRPC body: its first and last byte (nil when it is not one).
local function grpc_message(raw)
  if #raw < 5 or raw:byte(1) ~= 0 then
    return nil
  end
  return 6, math.min(#raw, 5 + raw:byte(2) * 16777216 + raw:byte(3) * 65536 + raw:byte(4) * 256 + raw:byte(5))
end

-- The top-level "model" string of a JSON object, as a JSON parser reads it; nil when there is none.
-- Returns false when the object is not one this scanner can read with certainty (an escape in a
-- top-level key or in the model's name, a model that is not a string, or an unterminated string):
-- the caller refuses the request then.
local function json_model(s)
  local i, depth, key, expect_key, model = 1, 0, nil, false, nil
  while i <= #s do
    local c = s:sub(i, i)
    if c == '"' then
      local j = i + 1
      local escaped = false
      while j <= #s and s:sub(j, j) ~= '"' do
        if s:sub(j, j) == "\\" then
          escaped = true
          j = j + 1
        end
        j = j + 1
      end
      if j > #s then
        return false
      end
      local text = s:sub(i + 1, j - 1)
      if depth == 1 and expect_key then
        if escaped then
          return false -- a key spelled with escapes could be "model" to a JSON parser
        end
        key = text
        expect_key = false
      elseif depth == 1 and key == "model" then
        if escaped then
          return false
        end
        model = text
        key = nil
      elseif depth == 1 then
        key = nil
      end
      i = j + 1
    else
      if c == "{" or c == "[" then
        if depth == 1 and key == "model" then
          return false
        end
        depth = depth + 1
        if depth == 1 then
          expect_key = true
        end
      elseif c == "}" or c == "]" then
        depth = depth - 1
      elseif c == "," and depth == 1 then
        expect_key, key = true, nil
      elseif depth == 1 and key == "model" and c:match("[%w%-]") then
        return false
      end
      i = i + 1
    end
  end
  return model
end

-- The model of an uncompressed gRPC message of the OpenAI API (meshserve.llm.v2): the top-level "model"
-- of the JSON in google.api.HttpBody.data (field 2; the last occurrence wins, as protobuf decodes it).
local function grpc_openai_model(raw)
  local first, last = grpc_message(raw)
  if first == nil then
    return nil
  end
  local data = pb_fields(raw, first, last, 2)
  if data == nil or #data == 0 then
    return nil
  end
  return json_model(raw:sub(data[#data][1], data[#data][2]))
end

-- params.model (field 1 of field 1) of an uncompressed gRPC message of the LLM API, as protobuf decodes
-- it: occurrences of a message field merge and the last value of a string field wins.
local function grpc_model(raw)
  local first, last = grpc_message(raw)
  if first == nil then
    return nil
  end
  local params = pb_fields(raw, first, last, 1)
  if params == nil then
    return nil
  end
  local model = nil
  for _, span in ipairs(params) do
    local models = pb_fields(raw, span[1], span[2], 1)
    if models == nil then
      return nil
    end
    for _, m in ipairs(models) do
      model = raw:sub(m[1], m[2])
    end
  end
  return model
end

-- Removes gRPC's own headers (grpc-status, grpc-message, grpc-accept-encoding) from a REST response.
local function drop_grpc_headers(headers)
  local names = {}
  for name, _ in pairs(headers) do
    if name:sub(1, 5) == "grpc-" then
      names[#names + 1] = name
    end
  end
  for _, name in ipairs(names) do
    headers:remove(name)
  end
end

-- A local reply; the edge's local_reply_config turns it into an OpenAI error body by its status.
local function refuse(handle, status, message)
  handle:respond({[":status"] = tostring(status), ["content-type"] = "text/plain"}, message)
end

function envoy_on_request(handle)
  local headers = handle:headers()
  headers:remove(MODEL_HEADER)
  local path = headers:get(":path") or ""
  if path:sub(1, #MESSAGES_PATH) == MESSAGES_PATH then
    handle:streamInfo():dynamicMetadata():set(EDGE_METADATA, "anthropic", true)
  end
  local grpc = is_grpc(headers)
  if not grpc then
    -- gRPC's own headers mean nothing on REST; a client's grpc-timeout would cut its request short.
    drop_grpc_headers(headers)
  end
  if headers:get(":method") ~= "POST" then
    return
  end
  local model
  if grpc then
    local openai = path:sub(1, #OPENAI_PREFIX) == OPENAI_PREFIX
    if not openai and path:sub(1, #LLM_PREFIX) ~= LLM_PREFIX then
      return
    end
    local body = handle:body()
    if body == nil then
      return
    end
    local raw = body:getBytes(0, body:length())
    if openai then
      model = grpc_openai_model(raw)
      if model == false then
        handle:respond({[":status"] = "200", ["content-type"] = "application/grpc", ["grpc-status"] = "3",
          ["grpc-message"] = "model: must be a plain string at the top level of the JSON body"}, "")
        return
      end
    else
      model = grpc_model(raw)
    end
  else
    if not STREAMABLE[path] then
      return
    end
    -- OpenAI's API takes JSON bodies; the body fields the edge acts on are read only from JSON.
    local media = (headers:get("content-type") or ""):match("^%s*([^;%s]*)"):lower()
    if media ~= "" and media ~= "application/json" then
      refuse(handle, 415, "Content-Type must be application/json")
      return
    end
    local fields = handle:streamInfo():dynamicMetadata():get(BODY_METADATA) or {}
    model = fields["model"]
    local stream = fields["stream"]
    if stream ~= nil and type(stream) ~= "boolean" then
      refuse(handle, 400, "stream: must be true or false")
      return
    end
    if stream == true then
      headers:replace(":path", path .. ":stream")
    end
  end
  if type(model) == "string" and #model <= 256 and model:match("^[%w%._:/%-]+$") then
    handle:headers():replace(MODEL_HEADER, model)
  end
end

-- The value of the top-level "message" key of a JSON object, still JSON-escaped.
local function json_message(raw)
  local _, stop = raw:find('"message"%s*:%s*"')
  if stop == nil then
    return nil
  end
  local i = stop + 1
  while i <= #raw do
    local c = raw:sub(i, i)
    if c == "\\" then
      i = i + 2
    elseif c == '"' then
      return raw:sub(stop + 1, i - 1)
    else
      i = i + 1
    end
  end
  return nil
end

-- Byte ranges a UTF-8 sequence's second byte may take after its first (no overlongs, no surrogates).
local SECOND = {[0xE0] = {0xA0, 0xBF}, [0xED] = {0x80, 0x9F}, [0xF0] = {0x90, 0xBF}, [0xF4] = {0x80, 0x8F}}

-- s with every byte that is not part of well-formed UTF-8 replaced by U+FFFD: the transcoder quotes a
-- caller's invalid bytes back in its messages, and a JSON body must be UTF-8.
local function utf8_clean(s)
  if not s:find("[\128-\255]") then
    return s
  end
  local out, i, n = {}, 1, #s
  while i <= n do
    local c = s:byte(i)
    local len = 0
    if c < 0x80 then
      len = 1
    elseif c >= 0xC2 and c <= 0xDF then
      len = 2
    elseif c >= 0xE0 and c <= 0xEF then
      len = 3
    elseif c >= 0xF0 and c <= 0xF4 then
      len = 4
    end
    local ok = len > 0 and i + len - 1 <= n
    for j = i + 1, ok and (i + len - 1) or i do
      local b = s:byte(j)
      local range = (j == i + 1 and SECOND[c]) or {0x80, 0xBF}
      if b < range[1] or b > range[2] then
        ok = false
        break
      end
    end
    if ok then
      out[#out + 1] = s:sub(i, i + len - 1)
      i = i + len
    else
      out[#out + 1] = "\239\191\189"
      i = i + 1
    end
  end
  return table.concat(out)
end

-- Longest error message the edge sends (the services bound theirs the same way): the transcoder quotes
-- a caller's bad value back whole, however long.
local MAX_MESSAGE = 1024

-- A JSON-escaped message cut to MAX_MESSAGE bytes, never inside an escape (utf8_clean mends a cut character).
local function bounded(message)
  if #message <= MAX_MESSAGE then
    return message
  end
  local cut = message:sub(1, MAX_MESSAGE):gsub("\\u%x?%x?%x?$", "")
  if #cut:match("(\\*)$") % 2 == 1 then
    cut = cut:sub(1, -2)
  end
  return cut .. "... (" .. (#message - #cut) .. " more bytes)"
end

local function json_escape(s)
  s = s:gsub('[%c"\\]', function(c)
    if c == '"' then return '\\"' end
    if c == "\\" then return "\\\\" end
    if c == "\n" then return "\\n" end
    return string.format("\\u%04x", c:byte())
  end)
  return s
end

function envoy_on_response(handle)
  local headers = handle:headers()
  if is_grpc(headers) then
    return
  end
  drop_grpc_headers(headers)
  -- An error's own OpenAI type (insufficient_quota), where it is not its status's: the backend names it.
  local error_type = headers:get("%%ERROR_TYPE_HEADER%%")
  if error_type ~= nil then
    headers:remove("%%ERROR_TYPE_HEADER%%")
  end
  local status = tonumber(headers:get(":status"))
  if status == nil or status < 400 then
    return
  end
  local content_type = headers:get("content-type") or ""
  local body = handle:body()
  local raw = ""
  if body ~= nil then
    raw = body:getBytes(0, body:length())
  end
  local edge = handle:streamInfo():dynamicMetadata():get(EDGE_METADATA) or {}
  local anthropic = edge["anthropic"] == true
  if raw:find('^%s*{%s*"error"%s*:') or (anthropic and raw:find('^%s*{%s*"type"%s*:%s*"error"')) then
    return
  end
  local message = nil
  if content_type:find("json", 1, true) then
    message = json_message(raw)
  end
  if message == nil then
    message = json_escape(raw)
  end
  message = utf8_clean(bounded(message))
  if message == "" then
    message = "HTTP " .. status
  end
  local out
  if anthropic then
    local kind = ANTHROPIC_TYPES[status] or (status >= 500 and "api_error" or "invalid_request_error")
    out = '{"type":"error","error":{"type":"' .. kind .. '","message":"' .. message .. '"}}'
  else
    local kind = TYPES[status] or {status >= 500 and "server_error" or "invalid_request_error", nil}
    if error_type ~= nil and error_type:match("^[%w_]+$") then
      kind = {error_type, error_type}
    end
    local code = kind[2] and ('"' .. kind[2] .. '"') or "null"
    out = '{"error":{"message":"' .. message .. '","type":"' .. kind[1] .. '","param":null,"code":' .. code .. '}}'
  end
  if body ~= nil then
    body:setBytes(out)
  end
  headers = handle:headers()
  headers:replace("content-type", "application/json")
  headers:replace("content-length", tostring(#out))
end
